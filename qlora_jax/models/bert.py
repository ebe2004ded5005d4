"""BERT encoder as transformers computes it, with masked-mean sentence
embeddings and a sequence classifier.

Module paths mirror transformers' BertModel: `embeddings/{word,position,
token_type}_embeddings`, `embeddings/LayerNorm`, `encoder/layer_{i}/
attention/self/{query,key,value}`, `.../attention/output/{dense,
LayerNorm}`, `.../intermediate/dense`, `.../output/{dense,LayerNorm}`.
The classifier nests the encoder under `bert/` and adds a trainable
`classifier` (BertForSequenceClassification's names).
"""

import flax.linen as nn
import jax.numpy as jnp

from qlora_jax import nn as qnn
from qlora_jax.models.activations import activation
from qlora_jax.models.attention import attend, default_inputs, segment_mask
from qlora_jax.models.config import BertConfig
from qlora_jax.models.layers import (
  Embed,
  LayerNorm,
  Options,
  dense,
  stack_blocks,
)


def _dropout(rate: float, deterministic: bool):
  return qnn.Dropout(rate, deterministic=deterministic or rate == 0)


class BertEmbeddings(nn.Module):
  config: BertConfig
  opts: Options

  @nn.compact
  def __call__(self, input_ids, positions, token_type_ids, deterministic):
    c, o = self.config, self.opts
    x = Embed(c.vocab_size, c.hidden_size, o, name="word_embeddings")(input_ids)
    types = Embed(
      c.type_vocab_size, c.hidden_size, o, name="token_type_embeddings"
    )
    x = x + types(token_type_ids)
    x = x + Embed(
      c.max_positions, c.hidden_size, o, name="position_embeddings"
    )(positions)
    x = LayerNorm(c.layer_norm_eps, o, name="LayerNorm")(x)
    return _dropout(c.hidden_dropout, deterministic)(x)


class BertSelfAttention(nn.Module):
  config: BertConfig
  opts: Options
  deterministic: bool = True

  @nn.compact
  def __call__(self, x, mask):
    c, det = self.config, self.deterministic
    b, length, _ = x.shape
    shape = (b, length, c.num_heads, c.head_dim)
    q = dense(self.opts, c.hidden_size, True, "query")(x, det).reshape(shape)
    k = dense(self.opts, c.hidden_size, True, "key")(x, det).reshape(shape)
    v = dense(self.opts, c.hidden_size, True, "value")(x, det).reshape(shape)
    drop = None if det else _dropout(c.attention_dropout, det)
    return attend(q, k, v, mask, drop)


class BertOutput(nn.Module):
  """LayerNorm(x + dropout(dense(h))): BertSelfOutput and BertOutput."""

  config: BertConfig
  opts: Options
  deterministic: bool = True

  @nn.compact
  def __call__(self, h, x):
    c, det = self.config, self.deterministic
    h = dense(self.opts, c.hidden_size, True, "dense")(h, det)
    h = _dropout(c.hidden_dropout, det)(h)
    return LayerNorm(c.layer_norm_eps, self.opts, name="LayerNorm")(h + x)


class BertAttention(nn.Module):
  config: BertConfig
  opts: Options
  deterministic: bool = True

  @nn.compact
  def __call__(self, x, mask):
    c, o, det = self.config, self.opts, self.deterministic
    h = BertSelfAttention(c, o, det, name="self")(x, mask)
    return BertOutput(c, o, det, name="output")(h, x)


class BertIntermediate(nn.Module):
  config: BertConfig
  opts: Options
  deterministic: bool = True

  @nn.compact
  def __call__(self, x):
    c = self.config
    h = dense(self.opts, c.intermediate_size, True, "dense")(
      x, self.deterministic
    )
    return activation(c.hidden_act)(h)


class BertLayer(nn.Module):
  config: BertConfig
  opts: Options
  deterministic: bool = True

  @nn.compact
  def __call__(self, x, mask, kv):
    c, o, det = self.config, self.opts, self.deterministic
    x = BertAttention(c, o, det, name="attention")(x, mask)
    h = BertIntermediate(c, o, det, name="intermediate")(x)
    return BertOutput(c, o, det, name="output")(h, x), kv


class BertEncoder(nn.Module):
  config: BertConfig
  opts: Options

  @nn.compact
  def __call__(self, x, mask, deterministic):
    c, o = self.config, self.opts
    attrs = {"config": c, "opts": o, "deterministic": deterministic}
    x, _ = stack_blocks(BertLayer, attrs, c.num_layers, o, "layer", x, (mask,))
    return x


def mean_pool(hidden, segment_ids, normalize: bool = False):
  """Mean of hidden [B, L, H] over non-padding tokens, optionally L2-unit."""
  m = (segment_ids != 0).astype(jnp.float32)[..., None]
  pooled = (hidden.astype(jnp.float32) * m).sum(1) / jnp.maximum(m.sum(1), 1e-9)
  if normalize:
    norm = jnp.linalg.norm(pooled, axis=-1, keepdims=True)
    pooled = pooled / jnp.maximum(norm, 1e-12)
  return pooled


class BertModel(nn.Module):
  """BERT encoder.

  `hidden_states(input_ids, segment_ids=None, positions=None,
  token_type_ids=None, deterministic=True)` gives the float32 last hidden
  state [B, L, hidden]; segment_ids (0 = padding) default to all ones,
  positions to 0 .. L-1, token types to 0. Calling the model gives the
  same, or with `pooling="mean"` the masked-mean sentence embedding
  [B, hidden] (L2-normalised when `normalize`).
  """

  config: BertConfig
  opts: Options = Options()
  pooling: str | None = None
  normalize: bool = False

  def setup(self):
    if self.pooling not in (None, "mean"):
      raise ValueError(f"unknown pooling {self.pooling!r}: expected 'mean'")
    self.embeddings = BertEmbeddings(self.config, self.opts)
    self.encoder = BertEncoder(self.config, self.opts)

  def hidden_states(
    self,
    input_ids,
    segment_ids=None,
    positions=None,
    token_type_ids=None,
    deterministic: bool = True,
  ):
    segment_ids, positions = default_inputs(
      input_ids, segment_ids, positions, self.config.max_positions
    )
    if token_type_ids is None:
      token_type_ids = jnp.zeros_like(input_ids)
    x = self.embeddings(input_ids, positions, token_type_ids, deterministic)
    mask = segment_mask(segment_ids, segment_ids)
    return self.encoder(x, mask, deterministic).astype(jnp.float32)

  def __call__(
    self,
    input_ids,
    segment_ids=None,
    positions=None,
    token_type_ids=None,
    deterministic: bool = True,
  ):
    h = self.hidden_states(
      input_ids, segment_ids, positions, token_type_ids, deterministic
    )
    if self.pooling is None:
      return h
    if segment_ids is None:
      segment_ids = jnp.ones(input_ids.shape, jnp.int32)
    return mean_pool(h, segment_ids, self.normalize)


class BertForSequenceClassification(nn.Module):
  """Encoder, masked-mean pooling, dropout and a new float32 `classifier`
  (trainable, "params" collection): float32 logits [B, num_labels]."""

  config: BertConfig
  num_labels: int
  opts: Options = Options()

  @nn.compact
  def __call__(
    self,
    input_ids,
    segment_ids=None,
    positions=None,
    token_type_ids=None,
    deterministic: bool = True,
  ):
    c = self.config
    h = BertModel(c, self.opts, name="bert").hidden_states(
      input_ids, segment_ids, positions, token_type_ids, deterministic
    )
    if segment_ids is None:
      segment_ids = jnp.ones(input_ids.shape, jnp.int32)
    pooled = mean_pool(h, segment_ids)
    rate = (
      c.hidden_dropout if c.classifier_dropout is None else c.classifier_dropout
    )
    pooled = _dropout(rate, deterministic)(pooled)
    head = nn.Dense(
      self.num_labels,
      dtype=jnp.float32,
      param_dtype=jnp.float32,
      name="classifier",
    )
    return head(pooled)
