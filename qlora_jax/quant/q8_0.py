"""GGML's Q8_0: blocks of 32 int8 codes q with one float16 scale d, value
d * q (llama.cpp's `quantize_row_q8_0`).

Per block: d = max |x| / 127 in float32, stored as float16; q = x * (1 /
d) rounded half away from zero (C's roundf), with the float32 d, as ggml
computes it. A block of zeros has d = 0 and codes 0.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp

BLOCK = 32


@functools.partial(
  jax.tree_util.register_dataclass,
  data_fields=["codes", "scales"],
  meta_fields=[],
)
@dataclasses.dataclass(frozen=True)
class Q8_0Tensor:
  """W [..., in] as int8 `codes` [..., in] and float16 `scales`
  [..., in / 32]: W[o, c] = scales[o, c // 32] * codes[o, c]."""

  codes: jax.Array
  scales: jax.Array

  @property
  def shape(self) -> tuple[int, ...]:
    return tuple(self.codes.shape)


def _roundf(x: jnp.ndarray) -> jnp.ndarray:
  """Round half away from zero, exactly (x - trunc(x) is exact)."""
  whole = jnp.trunc(x)
  frac = x - whole
  return whole + jnp.where(jnp.abs(frac) >= 0.5, jnp.sign(x), 0.0)


def quantize_q8_0(w: jnp.ndarray) -> Q8_0Tensor:
  """W [..., in] (in a multiple of 32) as Q8_0, by ggml's rule.

  Raises:
    ValueError: the last axis is not made of whole blocks of 32.
  """
  *lead, k = w.shape
  if k % BLOCK:
    raise ValueError(
      f"Q8_0 needs rows of whole blocks of {BLOCK}: shape {tuple(w.shape)}"
    )
  blocks = w.astype(jnp.float32).reshape(*lead, k // BLOCK, BLOCK)
  d = jnp.max(jnp.abs(blocks), axis=-1, keepdims=True) / jnp.float32(127)
  inv = jnp.where(d == 0, jnp.float32(0), jnp.float32(1) / d)
  q = _roundf(blocks * inv).astype(jnp.int8)
  return Q8_0Tensor(q.reshape(*lead, k), d[..., 0].astype(jnp.float16))


def dequantize_q8_0(t: Q8_0Tensor, dtype=jnp.float32) -> jnp.ndarray:
  """d * q as `dtype` (exact in float32: 11 by 8 significant bits)."""
  *lead, k = t.codes.shape
  q = t.codes.astype(jnp.float32).reshape(*lead, k // BLOCK, BLOCK)
  w = q * t.scales.astype(jnp.float32)[..., None]
  return w.reshape(*lead, k).astype(dtype)
