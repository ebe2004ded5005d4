"""Attention masks, dot-product attention (grouped-query) and the KV cache.

Masks come from segment ids: int32 [B, L], 0 = padding, tokens attend only
to keys of their own non-zero segment (so packed rows do not mix
documents). A padding query attends to every non-padding key, as in
transformers, so that its (unused) output stays finite.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np


def segment_mask(q_segments: jnp.ndarray, k_segments: jnp.ndarray):
  """bool [B, Lq, Lk]: key k is visible to query q."""
  q = q_segments[:, :, None]
  k = k_segments[:, None, :]
  return (k != 0) & ((q == k) | (q == 0))


def causal_mask(
  q_index: jnp.ndarray, k_index: jnp.ndarray, window: int | None = None
):
  """bool [Lq, Lk]: key index <= query index (and within `window`)."""
  q = q_index[:, None]
  k = k_index[None, :]
  allowed = k <= q
  if window is not None:
    allowed &= k > q - window
  return allowed


@jax.custom_vjp
def masked_softmax(scores: jnp.ndarray, mask: jnp.ndarray) -> jnp.ndarray:
  """Softmax over keys of scores [B, Hkv, G, Lq, Lk] where `mask` [B, Lq,
  Lk] allows (the rest get float32's lowest value first, as in
  transformers), as [B, Hkv, G * Lq, Lk]: the layout of the second matmul.

  Its backward pass keeps only the probabilities (and the unbroadcast
  mask). Differentiated op by op, the masked scores, their exponentials
  and the probabilities would each be kept, and in the reshaped layout
  once more; a scan over layers stacks every kept array per layer, and on
  a CPU writing and reading them back costs more than recomputing.
  """
  b, hkv, g, lq, lk = scores.shape
  scores = jnp.where(mask[:, None, None], scores, jnp.finfo(scores.dtype).min)
  return jax.nn.softmax(scores, axis=-1).reshape(b, hkv, g * lq, lk)


def _masked_softmax_fwd(scores, mask):
  probs = masked_softmax(scores, mask)
  return probs, (probs, mask)


def _masked_softmax_bwd(res, d_probs):
  probs, mask = res
  b, lq, lk = mask.shape
  d = probs * (d_probs - jnp.sum(d_probs * probs, axis=-1, keepdims=True))
  d = d.reshape(b, -1, d.shape[2] // lq, lq, lk)
  return jnp.where(mask[:, None, None], d, 0).astype(d_probs.dtype), None


masked_softmax.defvjp(_masked_softmax_fwd, _masked_softmax_bwd)


def attend(
  q: jnp.ndarray,
  k: jnp.ndarray,
  v: jnp.ndarray,
  mask: jnp.ndarray,
  dropout=None,
  kv_heads_first: bool = False,
  scale: float | None = None,
) -> jnp.ndarray:
  """Softmax attention with grouped key/value heads.

  Args:
    q: [B, Lq, H, D] queries.
    k: [B, Lk, Hkv, D] keys; H is a multiple of Hkv and query head h reads
      key head h // (H // Hkv) (transformers' `repeat_kv`).
    v: [B, Lk, Hkv, D] values.
    mask: bool [B, Lq, Lk].
    dropout: optional callable applied to the attention probabilities.
    kv_heads_first: k and v come as [B, Hkv, Lk, D] (the KV cache's
      layout) instead.
    scale: the scores' scale (default D ** -0.5).

  Returns:
    [B, Lq, H * D] in q's dtype. Scores and softmax are float32.
  """
  b, lq, h, d = q.shape
  if not kv_heads_first:
    k = k.transpose(0, 2, 1, 3)  # [b, hkv, lk, d]
    v = v.transpose(0, 2, 1, 3)
  hkv, lk = k.shape[1], k.shape[2]
  g = h // hkv
  # Batch axes (b, kv head) first in every operand: XLA's CPU dot runs such
  # batched matmuls (and their transposes in the backward pass) several
  # times faster than with the head axis in the middle.
  q = q.reshape(b, lq, hkv, g, d).transpose(0, 2, 3, 1, 4)
  q = q.reshape(b, hkv, g * lq, d)
  scores = jnp.einsum(
    "bhqd,bhkd->bhqk", q, k, preferred_element_type=jnp.float32
  )
  scale = d**-0.5 if scale is None else scale
  scores = scores.reshape(b, hkv, g, lq, lk) * np.float32(scale)
  probs = masked_softmax(scores, mask).astype(v.dtype)
  if dropout is not None:
    probs = dropout(probs)
  out = jnp.einsum("bhqk,bhkd->bhqd", probs, v)  # [b, hkv, g * lq, d]
  out = out.reshape(b, hkv, g, lq, d).transpose(0, 3, 1, 2, 4)
  return out.reshape(b, lq, h * d)


@functools.partial(
  jax.tree_util.register_dataclass,
  data_fields=["key", "value", "segment_ids", "index"],
  meta_fields=[],
)
@dataclasses.dataclass(frozen=True)
class KVCache:
  """Keys and values of every layer for incremental decoding.

  Attributes:
    key: [layers, B, Hkv, S, D] rotated keys: heads before positions, the
      layout attention reads, so that a decoding step never transposes
      the whole cache.
    value: [layers, B, Hkv, S, D].
    segment_ids: int32 [B, S] of the cached tokens (0 = padding or empty).
    index: int32 scalar, the slot the next token is written to.
  """

  key: jax.Array
  value: jax.Array
  segment_ids: jax.Array
  index: jax.Array

  @classmethod
  def zeros(cls, layers, batch, length, kv_heads, head_dim, dtype):
    shape = (layers, batch, kv_heads, length, head_dim)
    return cls(
      jnp.zeros(shape, dtype),
      jnp.zeros(shape, dtype),
      jnp.zeros((batch, length), jnp.int32),
      jnp.zeros((), jnp.int32),
    )


def write_kv(cache_kv, k, v, index):
  """One layer's cache (keys, values) [B, Hkv, S, D] with k, v [B, L, Hkv,
  D] written at positions `index`...`index + L`."""
  ck, cv = cache_kv
  at = (0, 0, index, 0)
  k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
  ck = jax.lax.dynamic_update_slice(ck, k.astype(ck.dtype), at)
  cv = jax.lax.dynamic_update_slice(cv, v.astype(cv.dtype), at)
  return ck, cv


def decoder_mask(
  segment_ids: jnp.ndarray,
  cache: KVCache | None,
  window: int | None = None,
):
  """Causal + segment mask for a decoder step, and the cache's segments.

  Without a cache queries and keys are the L input tokens. With one, the
  queries sit at slots index .. index + L - 1 of the cache and the keys are
  all its slots (empty slots have segment 0 and are never visible).

  Returns:
    (mask bool [B, L, Lk], key segment ids [B, Lk] or None).
  """
  length = segment_ids.shape[1]
  if cache is None:
    index = jnp.arange(length)
    causal = causal_mask(index, index, window)
    return segment_mask(segment_ids, segment_ids) & causal, None
  k_segments = jax.lax.dynamic_update_slice(
    cache.segment_ids, segment_ids.astype(jnp.int32), (0, cache.index)
  )
  q_index = cache.index + jnp.arange(length)
  k_index = jnp.arange(k_segments.shape[1])
  causal = causal_mask(q_index, k_index, window)
  return segment_mask(segment_ids, k_segments) & causal, k_segments


def default_inputs(input_ids, segment_ids, positions, max_positions=None):
  """Segment ids default to one segment, positions to 0 .. L-1.

  Raises:
    ValueError: default positions beyond `max_positions` (the size of a
      learned position table).
  """
  if segment_ids is None:
    segment_ids = jnp.ones(input_ids.shape, jnp.int32)
  if positions is None:
    length = input_ids.shape[1]
    if max_positions is not None and length > max_positions:
      raise ValueError(
        f"sequence length {length} exceeds the model's {max_positions} "
        "learned positions"
      )
    positions = jnp.broadcast_to(
      jnp.arange(input_ids.shape[1], dtype=jnp.int32), input_ids.shape
    )
  return segment_ids, positions
