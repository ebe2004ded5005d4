"""Llama-family decoder (Llama, Mistral, Qwen2, Qwen3, Gemma 3 text) as
transformers computes it.

Module paths mirror transformers' names: `model/embed_tokens`,
`model/layers_{i}/self_attn/{q,k,v,o}_proj` (and `{q,k}_norm`: Qwen3,
Gemma 3; Phi-3 fuses `qkv_proj`), `model/layers_{i}/mlp/{gate,up,down}_proj`
(Phi-3: `gate_up_proj`), `model/layers_{i}/
{input,post_attention}_layernorm` (and `{pre,post}_feedforward_layernorm`:
Gemma 3), `model/norm`, `lm_head` (absent when the embeddings are tied).
With `scan_layers` the blocks are one module `model/layers` whose
variables have a leading layer axis; a model that mixes sliding-window and
full attention (Gemma 3) scans over a per-layer flag that picks the
layer's mask and rotation, so its blocks still compile once.
"""

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from qlora_jax import nn as qnn
from qlora_jax import quant
from qlora_jax.models import rope
from qlora_jax.models.activations import activation, gated
from qlora_jax.models.attention import (
  KVCache,
  attend,
  decoder_mask,
  default_inputs,
  write_kv,
)
from qlora_jax.models.config import LlamaConfig
from qlora_jax.models.layers import (
  Embed,
  Options,
  RMSNorm,
  dense,
  stack_blocks,
)


class LlamaAttention(nn.Module):
  """Grouped-query self-attention with rotary embeddings."""

  config: LlamaConfig
  opts: Options
  deterministic: bool = True

  @nn.compact
  def __call__(self, x, mask, cos, sin, index, kv):
    c, det = self.config, self.deterministic
    b, length, _ = x.shape
    h, hkv, d = c.num_heads, c.num_kv_heads, c.head_dim
    # One 2-D input for the three projections: each would otherwise keep
    # its own reshaped copy of it for the backward pass.
    x = x.reshape(b * length, -1)
    if c.fused:  # Phi-3: one qkv_proj, rows [q; k; v]
      qkv = dense(self.opts, (h + 2 * hkv) * d, c.qkv_bias, "qkv_proj")(x, det)
      q, k, v = jnp.split(qkv, [h * d, (h + hkv) * d], axis=-1)
    else:
      q = dense(self.opts, h * d, c.qkv_bias, "q_proj")(x, det)
      k = dense(self.opts, hkv * d, c.qkv_bias, "k_proj")(x, det)
      v = dense(self.opts, hkv * d, c.qkv_bias, "v_proj")(x, det)
    q, k = q.reshape(b, length, h, d), k.reshape(b, length, hkv, d)
    if c.qk_norm:  # per head, before the rotation
      q = RMSNorm(c.rms_norm_eps, self.opts, c.norm_offset, name="q_norm")(q)
      k = RMSNorm(c.rms_norm_eps, self.opts, c.norm_offset, name="k_norm")(k)
    q = rope.apply_rotary(q, cos, sin)
    k = rope.apply_rotary(k, cos, sin)
    v = v.reshape(b, length, hkv, d)
    if kv is not None:
      kv = write_kv(kv, k, v, index)
      k, v = kv
    drop = None
    if c.attention_dropout > 0 and not det:
      drop = qnn.Dropout(c.attention_dropout, deterministic=False)
    out = attend(
      q, k, v, mask, drop, kv_heads_first=kv is not None, scale=c.attn_scale
    )
    return dense(self.opts, c.hidden_size, c.o_bias, "o_proj")(out, det), kv


class LlamaMLP(nn.Module):
  """down(act(gate(x)) * up(x))."""

  config: LlamaConfig
  opts: Options
  deterministic: bool = True

  @nn.compact
  def __call__(self, x):
    c, det = self.config, self.deterministic
    inter = c.intermediate_size
    down = dense(self.opts, c.hidden_size, c.mlp_bias, "down_proj")
    flat = x.reshape(-1, x.shape[-1])  # one kept copy for gate and up
    if c.fused:  # Phi-3: one gate_up_proj, rows [gate; up]
      gate_up = dense(self.opts, 2 * inter, c.mlp_bias, "gate_up_proj")
      g, u = jnp.split(gate_up(flat, det), 2, axis=-1)
    else:
      g = dense(self.opts, inter, c.mlp_bias, "gate_proj")(flat, det)
      u = dense(self.opts, inter, c.mlp_bias, "up_proj")(flat, det)
    h = gated(activation(c.hidden_act), g, u)
    return down(h, det).reshape(x.shape)


class LlamaBlock(nn.Module):
  """Pre-norm attention and MLP with residuals (Gemma 3: norms after each
  too). Called as (x, mask, cos, sin, index, kv), or for a model with
  per-layer kinds (x, full mask, sliding mask, full cos, sin, sliding cos,
  sin, index, sliding, kv) with `sliding` this layer's flag."""

  config: LlamaConfig
  opts: Options
  deterministic: bool = True

  @nn.compact
  def __call__(self, x, *args):
    c, o, det = self.config, self.opts, self.deterministic
    *args, kv = args
    if c.layer_kinds:
      mask_f, mask_s, cos_f, sin_f, cos_s, sin_s, index, sliding = args
      mask = jnp.where(sliding, mask_s, mask_f)
      cos = jnp.where(sliding, cos_s, cos_f)
      sin = jnp.where(sliding, sin_s, sin_f)
    else:
      mask, cos, sin, index = args

    def norm(name):
      return RMSNorm(c.rms_norm_eps, o, c.norm_offset, name=name)

    h = norm("input_layernorm")(x)
    h, kv = LlamaAttention(c, o, det, name="self_attn")(
      h, mask, cos, sin, index, kv
    )
    if c.sandwich_norms:
      x = x + norm("post_attention_layernorm")(h)
      h = norm("pre_feedforward_layernorm")(x)
      h = LlamaMLP(c, o, det, name="mlp")(h)
      return x + norm("post_feedforward_layernorm")(h), kv
    x = x + h
    h = norm("post_attention_layernorm")(x)
    return x + LlamaMLP(c, o, det, name="mlp")(h), kv


class LlamaModel(nn.Module):
  """Embeddings, blocks and the final norm: hidden states [B, L, hidden]."""

  config: LlamaConfig
  opts: Options

  @nn.compact
  def __call__(self, input_ids, segment_ids, positions, deterministic, cache):
    c, o = self.config, self.opts
    x = Embed(c.vocab_size, c.hidden_size, o, name="embed_tokens")(input_ids)
    if c.embed_scale:  # Gemma: sqrt(hidden), rounded to the compute dtype
      x = x * jnp.asarray(c.hidden_size**0.5, o.dtype)
    cos, sin = rope.tables(c.rope, positions, c.head_dim)
    kv = None if cache is None else (cache.key, cache.value)
    index = 0 if cache is None else cache.index
    per_layer = ()
    if c.layer_kinds:
      mask, k_segments = decoder_mask(segment_ids, cache)
      mask_s, _ = decoder_mask(segment_ids, cache, c.sliding_window)
      local = c.local_rope or c.rope
      cos_s, sin_s = rope.tables(local, positions, c.head_dim)
      shared = (mask, mask_s, cos, sin, cos_s, sin_s, index)
      per_layer = (jnp.asarray(c.layer_kinds, bool),)
    else:
      mask, k_segments = decoder_mask(segment_ids, cache, c.sliding_window)
      shared = (mask, cos, sin, index)
    attrs = {"config": c, "opts": o, "deterministic": deterministic}
    x, kv = stack_blocks(
      LlamaBlock, attrs, c.num_layers, o, "layers", x, shared, kv, per_layer
    )
    x = RMSNorm(c.rms_norm_eps, o, c.norm_offset, name="norm")(x)
    if cache is None:
      return x, None
    length = input_ids.shape[1]
    return x, KVCache(kv[0], kv[1], k_segments, cache.index + length)


class LlamaForCausalLM(nn.Module):
  """Llama-family language model: float32 logits [B, L, vocab].

  Call with input_ids int32 [B, L] and optional segment_ids (0 = padding,
  tokens attend within their segment), positions (default arange),
  `deterministic` (dropout off; rng "dropout" otherwise) and `cache` (a
  KVCache: returns (logits, updated cache) instead of logits).
  """

  config: LlamaConfig
  opts: Options = Options()
  # Where a tied head's table lies in the "base" collection.
  TIED_HEAD = ("model", "embed_tokens", "embedding")

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
    segment_ids, positions = default_inputs(input_ids, segment_ids, positions)
    model = LlamaModel(c, o, name="model")
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
    logits = logits.astype(jnp.float32)
    if c.final_logit_softcap:
      cap = np.float32(c.final_logit_softcap)
      logits = jnp.tanh(logits / cap) * cap
    return logits
