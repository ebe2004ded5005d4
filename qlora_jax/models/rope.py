"""Rotary position embeddings in Hugging Face's layout (rotate_half).

The inverse frequencies follow transformers' `modeling_rope_utils`
("default", "linear", "llama3" and "longrope" types), computed in float32.
"""

import math

import jax.numpy as jnp
import numpy as np

from qlora_jax.models.config import ROPE_TYPES, RopeConfig


def inverse_frequencies(
  rope: RopeConfig, head_dim: int, long: bool = False
) -> np.ndarray:
  """float32 [head_dim // 2] inverse wavelengths (LongRoPE: the set for
  sequences past the pretraining length when `long`)."""
  exponent = np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32)
  base = np.float32(rope.theta) ** (exponent / head_dim)
  if rope.type == "longrope":
    ext = np.asarray(rope.long_factor if long else rope.short_factor)
    return (1.0 / (ext.astype(np.float32) * base)).astype(np.float32)
  inv = (1.0 / base).astype(np.float32)
  if rope.type == "default":
    return inv
  if rope.type == "linear":
    return (inv / np.float32(rope.factor)).astype(np.float32)
  if rope.type == "llama3":
    return _llama3(inv, rope)
  raise ValueError(
    f"unsupported rope type {rope.type!r}: expected {ROPE_TYPES}"
  )


def _llama3(inv: np.ndarray, rope: RopeConfig) -> np.ndarray:
  """Llama 3.1: long wavelengths divided by `factor`, a smooth middle band."""
  f32 = np.float32
  low_wavelen = f32(rope.original_max_positions / rope.low_freq_factor)
  high_wavelen = f32(rope.original_max_positions / rope.high_freq_factor)
  wavelen = f32(2 * math.pi) / inv
  scaled = np.where(wavelen > low_wavelen, inv / f32(rope.factor), inv)
  smooth = (
    f32(rope.original_max_positions) / wavelen - rope.low_freq_factor
  ) / (rope.high_freq_factor - rope.low_freq_factor)
  smoothed = (1 - smooth) * scaled / f32(rope.factor) + smooth * scaled
  medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
  return np.where(medium, smoothed, scaled).astype(np.float32)


def rotary_table(positions: jnp.ndarray, inv_freq: np.ndarray):
  """cos, sin float32 [..., head_dim] for int positions [...]."""
  freqs = positions[..., None].astype(jnp.float32) * jnp.asarray(inv_freq)
  angles = jnp.concatenate([freqs, freqs], axis=-1)
  return jnp.cos(angles), jnp.sin(angles)


def tables(rope: RopeConfig, positions: jnp.ndarray, head_dim: int):
  """cos, sin float32 [..., head_dim] of `rope` at int positions [...].

  LongRoPE picks its long factors when the largest position of the call
  reaches the pretraining length, as transformers does for each forward
  (so a KV cache keeps the keys rotated by the set of their own call), and
  scales both tables by its attention factor."""
  cos, sin = rotary_table(positions, inverse_frequencies(rope, head_dim))
  if rope.type != "longrope":
    return cos, sin
  cos_l, sin_l = rotary_table(
    positions, inverse_frequencies(rope, head_dim, long=True)
  )
  long = jnp.max(positions) + 1 > rope.original_max_positions
  scale = jnp.float32(rope.attention_factor)
  return (
    jnp.where(long, cos_l, cos) * scale,
    jnp.where(long, sin_l, sin) * scale,
  )


def _rotate_half(x: jnp.ndarray) -> jnp.ndarray:
  half = x.shape[-1] // 2
  return jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)


def apply_rotary(x: jnp.ndarray, cos: jnp.ndarray, sin: jnp.ndarray):
  """Rotates x [B, L, heads, D] by the table cos, sin [B, L, D]."""
  cos, sin = cos[:, :, None, :], sin[:, :, None, :]
  xf = x.astype(jnp.float32)
  return (xf * cos + _rotate_half(xf) * sin).astype(x.dtype)
