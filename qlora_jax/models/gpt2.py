"""GPT-2 as transformers computes it (GPT2LMHeadModel).

Module paths mirror transformers' names: `transformer/wte`, `transformer/
wpe`, `transformer/h_{i}/ln_1`, `.../attn/c_attn` (fused q, k, v),
`.../attn/c_proj`, `.../ln_2`, `.../mlp/c_fc`, `.../mlp/c_proj`,
`transformer/ln_f`; `lm_head` only for untied checkpoints. transformers'
Conv1D stores weights as [in, out]; the loader transposes them into the
[out, in] layout of QLoRADense.
"""

import flax.linen as nn
import jax.numpy as jnp

from qlora_jax import nn as qnn
from qlora_jax import quant
from qlora_jax.models.activations import activation
from qlora_jax.models.attention import (
  KVCache,
  attend,
  decoder_mask,
  default_inputs,
  write_kv,
)
from qlora_jax.models.config import GPT2Config
from qlora_jax.models.layers import (
  Embed,
  LayerNorm,
  Options,
  dense,
  stack_blocks,
)


def _dropout(rate: float, deterministic: bool):
  return qnn.Dropout(rate, deterministic=deterministic or rate == 0)


class GPT2Attention(nn.Module):
  config: GPT2Config
  opts: Options
  deterministic: bool = True

  @nn.compact
  def __call__(self, x, mask, index, kv):
    c, det = self.config, self.deterministic
    b, length, _ = x.shape
    h, d = c.num_heads, c.head_dim
    qkv = dense(self.opts, 3 * c.hidden_size, True, "c_attn")(x, det)
    q, k, v = jnp.split(qkv.reshape(b, length, 3, h, d), 3, axis=2)
    q, k, v = q[:, :, 0], k[:, :, 0], v[:, :, 0]
    if kv is not None:
      kv = write_kv(kv, k, v, index)
      k, v = kv
    drop = None if det else _dropout(c.attention_dropout, det)
    out = attend(q, k, v, mask, drop, kv_heads_first=kv is not None)
    out = dense(self.opts, c.hidden_size, True, "c_proj")(out, det)
    return _dropout(c.resid_dropout, det)(out), kv


class GPT2MLP(nn.Module):
  config: GPT2Config
  opts: Options
  deterministic: bool = True

  @nn.compact
  def __call__(self, x):
    c, det = self.config, self.deterministic
    h = dense(self.opts, c.intermediate_size, True, "c_fc")(x, det)
    h = dense(self.opts, c.hidden_size, True, "c_proj")(
      activation(c.hidden_act)(h), det
    )
    return _dropout(c.resid_dropout, det)(h)


class GPT2Block(nn.Module):
  config: GPT2Config
  opts: Options
  deterministic: bool = True

  @nn.compact
  def __call__(self, x, mask, index, kv):
    c, o, det = self.config, self.opts, self.deterministic
    h = LayerNorm(c.layer_norm_eps, o, name="ln_1")(x)
    h, kv = GPT2Attention(c, o, det, name="attn")(h, mask, index, kv)
    x = x + h
    h = LayerNorm(c.layer_norm_eps, o, name="ln_2")(x)
    return x + GPT2MLP(c, o, det, name="mlp")(h), kv


class GPT2Model(nn.Module):
  config: GPT2Config
  opts: Options

  @nn.compact
  def __call__(self, input_ids, segment_ids, positions, deterministic, cache):
    c, o = self.config, self.opts
    x = Embed(c.vocab_size, c.hidden_size, o, name="wte")(input_ids)
    x = x + Embed(c.max_positions, c.hidden_size, o, name="wpe")(positions)
    x = _dropout(c.embd_dropout, deterministic)(x)
    mask, k_segments = decoder_mask(segment_ids, cache)
    kv = None if cache is None else (cache.key, cache.value)
    index = 0 if cache is None else cache.index
    attrs = {"config": c, "opts": o, "deterministic": deterministic}
    x, kv = stack_blocks(
      GPT2Block, attrs, c.num_layers, o, "h", x, (mask, index), kv
    )
    x = LayerNorm(c.layer_norm_eps, o, name="ln_f")(x)
    if cache is None:
      return x, None
    length = input_ids.shape[1]
    return x, KVCache(kv[0], kv[1], k_segments, cache.index + length)


class GPT2LMHeadModel(nn.Module):
  """GPT-2 language model: float32 logits [B, L, vocab].

  Same inputs as `LlamaForCausalLM` (segment_ids, positions,
  deterministic, cache).
  """

  config: GPT2Config
  opts: Options = Options()
  # Where a tied head's table lies in the "base" collection.
  TIED_HEAD = ("transformer", "wte", "embedding")

  @nn.compact
  def __call__(
    self,
    input_ids,
    segment_ids=None,
    positions=None,
    deterministic: bool = True,
    cache: KVCache | None = None,
    *,
    hidden=None,
    return_hidden: bool = False,
    decode_head: quant.Q8_0Tensor | None = None,
  ):
    """Logits; or the final hidden states (`return_hidden`, with the cache
    when given one); or, given
    `hidden` [..., hidden_size], the head's logits of those (chunked
    losses over large vocabularies apply the head to slices of tokens).
    `decode_head`, a Q8_0 copy of the head weight (`models.decode_head`),
    replaces the head's matmul (decoding only)."""
    c, o = self.config, self.opts
    if hidden is not None:
      return self._head(hidden, deterministic, decode_head)
    segment_ids, positions = default_inputs(
      input_ids, segment_ids, positions, c.max_positions
    )
    model = GPT2Model(c, o, name="transformer")
    x, cache = model(input_ids, segment_ids, positions, deterministic, cache)
    if return_hidden:
      return x if cache is None else (x, cache)
    logits = self._head(x, deterministic, decode_head)
    return logits if cache is None else (logits, cache)

  def _head(self, x, deterministic: bool, decode_head=None):
    c, o = self.config, self.opts
    if decode_head is not None:
      logits = qnn.matmul_q8_0(x, decode_head)
    elif c.tie_word_embeddings:
      table = self.variables["base"]
      for key in self.TIED_HEAD:
        table = table[key]
      logits = qnn.frozen_matmul(x, table, o.dtype)  # upcast in chunks
    else:
      logits = dense(o, c.vocab_size, False, "lm_head")(x, deterministic)
    return logits.astype(jnp.float32)
