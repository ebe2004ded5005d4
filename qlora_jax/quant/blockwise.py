"""Blockwise absmax quantization and double quantization, as bitsandbytes.

Pure jnp on flat float32 arrays; no Python loop over blocks. The rules (see
bitsandbytes' portable CPU backend) are:

* per block of `block_size` elements, `absmax = max|x|`; full blocks are scaled
  by a reciprocal, `x * (1 / max(absmax, 1e-38))`, a final partial block by a
  division, `x / max(absmax, 1e-38)`; the result is clamped to [-1, 1];
* the code is the number of float32 midpoints of the sorted table strictly
  below the scaled value (ties go to the lower code);
* double quantization stores `absmax - mean(absmax)` with the signed 8-bit
  dynamic map in groups of 256.
"""

import jax
import jax.numpy as jnp
import numpy as np

from qlora_jax.quant.codebooks import FP8_E4M3_MAX, DataType
from qlora_jax.quant.dynamic_map import DYNAMIC_MAP_SIGNED

DQ_GROUP = 256  # block absmaxes per second-level group
_TINY = np.float32(1e-38)
# Largest table searched by comparing with every midpoint; larger tables use
# a branchless binary search.
_COMPARE_ALL_MAX = 16


def num_blocks(n: int, block_size: int) -> int:
  return -(-n // block_size)


def _blocks(x: jnp.ndarray, block_size: int) -> jnp.ndarray:
  """Flat x as [num_blocks, block_size], zero-padding a final partial block."""
  n = x.shape[0]
  pad = num_blocks(n, block_size) * block_size - n
  if pad:
    x = jnp.concatenate([x, jnp.zeros((pad,), x.dtype)])
  return x.reshape(-1, block_size)


def _scale_blocks(x: jnp.ndarray, block_size: int):
  """Returns (scaled blocks clamped to [-1, 1], absmax per block)."""
  n = x.shape[0]
  xb = _blocks(x.astype(jnp.float32), block_size)
  absmax = jnp.max(jnp.abs(xb), axis=1)
  denom = jnp.maximum(absmax, _TINY)[:, None]
  scaled = xb * (jnp.float32(1.0) / denom)
  if n % block_size:
    last = xb.shape[0] - 1
    is_last = (jnp.arange(xb.shape[0]) == last)[:, None]
    scaled = jnp.where(is_last, xb / denom, scaled)
  # XLA on CPU flushes the subnormal 1e-38 to zero: an all-zero block would
  # divide 0 by 0. bitsandbytes scales it to exact zeros.
  scaled = jnp.where(absmax[:, None] > 0, scaled, 0.0)
  return jnp.clip(scaled, -1.0, 1.0), absmax


def _count_below(
  values: jnp.ndarray, sorted_thresholds: np.ndarray, inclusive: bool = False
):
  """Number of thresholds strictly below (or, inclusive, <=) each value."""
  below = jnp.greater_equal if inclusive else jnp.greater
  t = len(sorted_thresholds)
  if t <= _COMPARE_ALL_MAX:
    thr = jnp.asarray(sorted_thresholds)
    return jnp.sum(below(values[..., None], thr), axis=-1, dtype=jnp.int32)
  # Branchless binary search over thresholds padded with +inf to 2**m - 1.
  size = 1 << int(np.ceil(np.log2(t + 1)))
  padded = np.full(size, np.inf, np.float32)
  padded[:t] = sorted_thresholds
  thr = jnp.asarray(padded)
  idx = jnp.zeros(values.shape, jnp.int32)
  step = size // 2
  while step:
    cand = idx + step
    idx = jnp.where(below(values, thr[cand - 1]), cand, idx)
    step //= 2
  return idx


def encode(scaled: jnp.ndarray, dt: DataType) -> jnp.ndarray:
  """Codes (uint8) of values already scaled into [-1, 1]."""
  if dt.uses_cast:
    f8 = (scaled * jnp.float32(FP8_E4M3_MAX)).astype(jnp.float8_e4m3fn)
    return f8.view(jnp.uint8)
  idx = _count_below(scaled, dt.thresholds)
  if np.array_equal(dt.encode_codes, np.arange(len(dt.encode_codes))):
    return idx.astype(jnp.uint8)
  return jnp.asarray(dt.encode_codes)[idx]


def quantize_blocks(x: jnp.ndarray, dt: DataType, block_size: int):
  """Flat x -> (codes uint8[n], absmax float32[num_blocks])."""
  n = x.shape[0]
  scaled, absmax = _scale_blocks(x, block_size)
  codes = encode(scaled, dt).reshape(-1)[:n]
  return codes, absmax


def dequantize_blocks(
  codes: jnp.ndarray, absmax: jnp.ndarray, dt: DataType, block_size: int
) -> jnp.ndarray:
  """Codes and per-block absmax -> flat float32 values (table * absmax)."""
  n = codes.shape[0]
  values = jnp.asarray(dt.values)[codes]
  if n % block_size == 0:
    return (values.reshape(-1, block_size) * absmax[:, None]).reshape(-1)
  per_element = jnp.repeat(absmax, block_size, total_repeat_length=n)
  return values * per_element


def double_quantize(absmax: jnp.ndarray):
  """absmax -> (uint8 codes, float32 absmax2 per group of 256, f32 offset)."""
  n = absmax.shape[0]
  offset = jnp.mean(absmax)
  centred = _blocks(absmax - offset, DQ_GROUP)
  absmax2 = jnp.max(jnp.abs(centred), axis=1)
  safe = jnp.where(absmax2 > 0, absmax2, 1.0)[:, None]
  normed = jnp.where(absmax2[:, None] > 0, centred / safe, 0.0)
  # bitsandbytes searches a table whose first entry is forced to -1: the
  # largest index whose value is <= the input, then one up when the right
  # neighbour is strictly closer.
  table = DYNAMIC_MAP_SIGNED.copy()
  table[0] = -1.0
  tbl = jnp.asarray(table)
  left = _count_below(normed, table, inclusive=True) - 1
  right = jnp.minimum(left + 1, 255)
  dist_left = jnp.abs(normed - tbl[left])
  dist_right = jnp.abs(normed - tbl[right])
  q8 = jnp.where((left < 255) & (dist_right < dist_left), right, left)
  return q8.reshape(-1)[:n].astype(jnp.uint8), absmax2, offset


def dequantize_absmax(
  q8: jnp.ndarray, absmax2: jnp.ndarray, offset: jnp.ndarray
) -> jnp.ndarray:
  """Second level back to float32 block absmax: code2[q8] * absmax2 + offset."""
  n = q8.shape[0]
  values = jnp.asarray(DYNAMIC_MAP_SIGNED)[q8]
  scale = jnp.repeat(absmax2, DQ_GROUP, total_repeat_length=n)
  return _rounded(values * scale, absmax2) + offset


def _rounded(product: jnp.ndarray, nonnegative: jnp.ndarray) -> jnp.ndarray:
  """`product`, rounded to float32 before any later addition.

  XLA on CPU contracts `a * b + c` into a fused multiply-add, which rounds
  once; bitsandbytes rounds the product and the sum separately. OR-ing the
  product's bits with a zero the compiler cannot prove (the sign bit of a
  non-negative runtime value) keeps the multiply and the add apart.
  """
  zero = jax.lax.bitcast_convert_type(nonnegative[:1], jnp.uint32) >> 31
  bits = jax.lax.bitcast_convert_type(product, jnp.uint32) | zero
  return jax.lax.bitcast_convert_type(bits, jnp.float32)
