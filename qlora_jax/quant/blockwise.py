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

Every finite float32 magnitude is handled (up to 3.4e38; bitsandbytes'
rules are followed exactly below `_HUGE` = 2**126): a block whose absmax
is at least 2**126 is scaled by 2**-8 first, so that its reciprocal is not
a subnormal (which XLA on CPU flushes to zero); absmaxes whose sum would
overflow are double-quantized scaled by a power of two; and a
reconstructed absmax is capped at float32's largest value. Each of these
is exact in powers of two, so a tensor times 2**k quantizes to the same
codes with scales times 2**k.

Asymmetric blocks (`int<k>_asym`) follow GGML's Q4_1 quantizer instead (the
`gguf` package's NumPy reference, bit for bit): per block the minimum m and
maximum M in float32, d = (M - m) / (2**k - 1), q = trunc((x - m) * (1 / d)
+ 0.5) clipped to [0, 2**k - 1] (q = 0 where d = 0), and d, m stored as
float16; values are d * q + m in float32.
"""

import jax
import jax.numpy as jnp
import numpy as np

from qlora_jax.quant.codebooks import FP8_E4M3_MAX, DataType
from qlora_jax.quant.dynamic_map import DYNAMIC_MAP_SIGNED

DQ_GROUP = 256  # block absmaxes per second-level group
_TINY = np.float32(1e-38)
_HUGE = np.float32(2.0**126)  # 1 / absmax is a subnormal above this
_FLOAT32_MAX = np.float32(np.finfo(np.float32).max)
# Most thresholds that encoding compares with one by one (NF-k and Int-k up
# to k = 6); larger tables use `_count_below`. Measured on 4096x4096, 31 and
# 63 comparisons are faster than the grid lookup, 255 are not.
_COMPARE_ALL_MAX = 63


def num_blocks(n: int, block_size: int) -> int:
  return -(-n // block_size)


def _blocks(x: jnp.ndarray, block_size: int) -> jnp.ndarray:
  """Flat x as [num_blocks, block_size], zero-padding a final partial block."""
  n = x.shape[0]
  pad = num_blocks(n, block_size) * block_size - n
  if pad:
    x = jnp.concatenate([x, jnp.zeros((pad,), x.dtype)])
  return x.reshape(-1, block_size)


def _divide(x: jnp.ndarray, d: jnp.ndarray) -> jnp.ndarray:
  """x / d as an IEEE division, d broadcasting against x.

  XLA rewrites `a / broadcast(b)` into `a * broadcast(1 / b)`, which can differ
  in the last bit; bitsandbytes divides. OR-ing the broadcast divisor with a
  zero the compiler cannot prove (the sign bit of |x|) keeps the division.
  """
  zero = jax.lax.bitcast_convert_type(jnp.abs(x), jnp.uint32) >> 31
  den = jnp.broadcast_to(d, x.shape)
  den = jax.lax.bitcast_convert_type(
    jax.lax.bitcast_convert_type(den, jnp.uint32) | zero, jnp.float32
  )
  return x / den


def _scale_blocks(x: jnp.ndarray, block_size: int):
  """Returns (scaled blocks clamped to [-1, 1], absmax per block)."""
  n = x.shape[0]
  xb = _blocks(x.astype(jnp.float32), block_size)
  absmax = jnp.max(jnp.abs(xb), axis=1)
  # Blocks of absmax >= 2**126 are scaled by 2**-8 (exact), so that the
  # reciprocal stays normal; the others are left bit for bit as they are.
  huge = (absmax >= _HUGE)[:, None]
  xb = jnp.where(huge, xb * jnp.float32(2.0**-8), xb)
  denom = jnp.where(huge[:, 0], absmax * jnp.float32(2.0**-8), absmax)
  denom = jnp.maximum(denom, _TINY)[:, None]
  scaled = xb * (jnp.float32(1.0) / denom)
  if n % block_size:
    scaled = scaled.at[-1].set(_divide(xb[-1], denom[-1]))
  # XLA on CPU flushes the subnormal 1e-38 to zero: an all-zero block would
  # divide 0 by 0. bitsandbytes scales it to exact zeros.
  scaled = jnp.where(absmax[:, None] > 0, scaled, 0.0)
  return jnp.clip(scaled, -1.0, 1.0), absmax


def _bucket_tables(sorted_thresholds: np.ndarray):
  """A uniform grid over [-1, 1] for `_count_below`, or None if too dense.

  Returns (grid size G, base, K): for a value v in [-1, 1] in grid cell
  g = floor((v + 1) * G / 2), the count of thresholds below v lies in
  [base[g], base[g] + K]. Cells are widened by half a cell on each side, far
  more than the float32 rounding of g.
  """
  thr = sorted_thresholds.astype(np.float64)
  for size in (256, 512, 1024, 2048, 4096):
    lo = np.arange(size) * (2.0 / size) - 1.0
    half = 1.0 / size
    base = np.searchsorted(thr, lo - half, side="left")
    top = np.searchsorted(thr, lo + 3 * half, side="right")
    k = int((top - base).max())
    if k <= 1:
      return size, base.astype(np.int32), k
  return None


def _count_below(
  values: jnp.ndarray, sorted_thresholds: np.ndarray, inclusive: bool = False
) -> jnp.ndarray:
  """Number of thresholds strictly below (or, inclusive, <=) each value.

  For values in [-1, 1]: a lower bound from a uniform grid, corrected with
  one comparison per threshold that can share a grid cell; tables too dense
  for a grid of 4096 cells use a branchless binary search. Both give exactly
  the counts of a search over the sorted thresholds.
  """
  below = jnp.greater_equal if inclusive else jnp.greater
  t = len(sorted_thresholds)
  padded = np.append(sorted_thresholds, np.inf).astype(np.float32)
  grid = _bucket_tables(sorted_thresholds)
  if grid is not None:
    size, base, k = grid
    cell = ((values + 1.0) * jnp.float32(size / 2)).astype(jnp.int32)
    idx = jnp.asarray(base)[jnp.clip(cell, 0, size - 1)]
    for _ in range(k):
      idx = idx + below(values, jnp.asarray(padded)[idx]).astype(jnp.int32)
    return idx
  # Branchless binary search over thresholds padded with +inf to 2**m - 1.
  size = 1 << int(np.ceil(np.log2(t + 1)))
  padded = np.full(size, np.inf, np.float32)
  padded[:t] = sorted_thresholds
  thr = jnp.asarray(padded)
  step = size // 2
  # The first probe is the same for every value: a scalar, not a gather of a
  # constant index (which XLA would constant-fold into a huge array).
  idx = jnp.where(below(values, padded[step - 1]), step, 0)
  step //= 2
  while step:
    cand = idx + step
    idx = jnp.where(below(values, thr[cand - 1]), cand, idx)
    step //= 2
  return idx


def _encode_small(values: jnp.ndarray, dt: DataType) -> jnp.ndarray:
  """Codes of a table with few thresholds: one comparison per threshold.

  The code of sorted entry i is reached by adding, for each threshold below
  the value, the step from one entry's code to the next (mod 256), so that a
  non-monotone code order (FP4) needs no lookup. The sums run in uint8 over
  at most 32 thresholds each: XLA then vectorises them and keeps no wider
  code array in memory (on 4096x4096, 3 to 6 times faster than a chain of
  elementwise adds or an int32 sum, and 63 thresholds in one sum are 9 times
  slower than in two).
  """
  codes = dt.encode_codes.astype(np.int64)
  steps = np.diff(codes) % 256
  thresholds = dt.thresholds
  out = jnp.uint8(codes[0])
  for start in range(0, len(thresholds), 32):
    above = values[..., None] > jnp.asarray(thresholds[start : start + 32])
    step = jnp.asarray(steps[start : start + 32], jnp.uint8)
    added = jnp.where(above, step, jnp.uint8(0))
    out = out + jnp.sum(added, axis=-1, dtype=jnp.uint8)
  return out


def encode(scaled: jnp.ndarray, dt: DataType) -> jnp.ndarray:
  """Codes (uint8) of values already scaled into [-1, 1]."""
  if dt.uses_cast:
    f8 = (scaled * jnp.float32(FP8_E4M3_MAX)).astype(jnp.float8_e4m3fn)
    return f8.view(jnp.uint8)
  if len(dt.thresholds) <= _COMPARE_ALL_MAX:
    return _encode_small(scaled, dt)
  idx = _count_below(scaled, dt.thresholds)
  if np.array_equal(dt.encode_codes, np.arange(len(dt.encode_codes))):
    return idx.astype(jnp.uint8)
  return jnp.asarray(dt.encode_codes)[idx]


def select_values(values, idx: jnp.ndarray) -> jnp.ndarray:
  """values[idx], exactly, for a table of 2**k float32 values, by a tree
  of selects on idx's bits (vectorized where a gather is not: XLA:CPU
  loads gathered elements one by one, Mosaic has no vector gather)."""
  level = [np.float32(v) for v in values]
  bit = 0
  while len(level) > 1:
    on = (idx & (1 << bit)) != 0
    level = [
      jnp.where(on, level[2 * i + 1], level[2 * i])
      for i in range(len(level) // 2)
    ]
    bit += 1
  return level[0]


def quantize_blocks(x: jnp.ndarray, dt: DataType, block_size: int):
  """Flat x -> (codes uint8[n], absmax float32[num_blocks])."""
  n = x.shape[0]
  scaled, absmax = _scale_blocks(x, block_size)
  codes = encode(scaled, dt).reshape(-1)[:n]
  return codes, absmax


def dequantize_blocks(
  codes: jnp.ndarray, absmax: jnp.ndarray, dt: DataType, block_size: int
) -> jnp.ndarray:
  """Codes and per-block absmax -> flat float32 values (table * absmax).

  The codes index the table without bounds handling: every k-bit code is
  in range by construction, and the clamp cost XLA's CPU loop ~3%.
  """
  n = codes.shape[0]
  table = jnp.asarray(dt.values)
  values = table.at[_blocks(codes, block_size)].get(mode="promise_in_bounds")
  return (values * absmax[:, None]).reshape(-1)[:n]


def double_quantize(absmax: jnp.ndarray):
  """absmax -> (uint8 codes, float32 absmax2 per group of 256, f32 offset).

  Absmaxes whose sum would overflow float32 (their mean is the offset) are
  double-quantized scaled by 2**-k, 2**k >= 2n, and absmax2 and the offset
  scaled back: exactly the codes and scales of a scaled copy. The other
  branch is the plain rule, whose fused `absmax - mean` stays as it was.
  """
  n = absmax.shape[0]
  k = int(np.ceil(np.log2(n))) + 1

  def scaled(a):
    q8, absmax2, offset = _double_quantize(a * jnp.float32(2.0**-k))
    return q8, absmax2 * jnp.float32(2.0**k), offset * jnp.float32(2.0**k)

  overflows = jnp.max(absmax) > _FLOAT32_MAX / np.float32(n)
  return jax.lax.cond(overflows, scaled, _double_quantize, absmax)


def _double_quantize(absmax: jnp.ndarray):
  n = absmax.shape[0]
  offset = jnp.mean(absmax)
  centred = _blocks(absmax - offset, DQ_GROUP)
  absmax2 = jnp.max(jnp.abs(centred), axis=1)
  safe = jnp.where(absmax2 > 0, absmax2, 1.0)[:, None]
  normed = jnp.where(absmax2[:, None] > 0, _divide(centred, safe), 0.0)
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
  values = jnp.asarray(DYNAMIC_MAP_SIGNED)[_blocks(q8, DQ_GROUP)]
  product = _rounded(values * absmax2[:, None], absmax2)
  # Near float32's largest value the 8-bit code may round the sum past it.
  absmax = jnp.minimum(product + offset, _FLOAT32_MAX)
  return absmax.reshape(-1)[:n]


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


def _edge_blocks(x: jnp.ndarray, block_size: int) -> jnp.ndarray:
  """Flat x as [num_blocks, block_size], a final partial block padded with
  its last value (which changes neither its minimum nor its maximum)."""
  n = x.shape[0]
  pad = num_blocks(n, block_size) * block_size - n
  if pad:
    x = jnp.concatenate([x, jnp.broadcast_to(x[-1:], (pad,))])
  return x.reshape(-1, block_size)


def quantize_asym_blocks(x: jnp.ndarray, bits: int, block_size: int):
  """Flat x -> (codes uint8[n], scale d float16, minimum m float16), one d
  and m per block (GGML's Q4_1 rule for bits = 4, block_size = 32)."""
  n = x.shape[0]
  xb = _edge_blocks(x.astype(jnp.float32), block_size)
  top = jnp.max(xb, axis=1, keepdims=True)
  low = jnp.min(xb, axis=1, keepdims=True)
  levels = 2**bits - 1
  d = _divide(top - low, jnp.full_like(top, levels))
  inv = jnp.where(d == 0, 0.0, _divide(jnp.ones_like(d), d))
  scaled = _rounded((xb - low) * inv, jnp.abs(d[:, 0]))
  q = jnp.clip(jnp.trunc(scaled + jnp.float32(0.5)), 0, levels)
  codes = q.astype(jnp.uint8).reshape(-1)[:n]
  return codes, d[:, 0].astype(jnp.float16), low[:, 0].astype(jnp.float16)


def dequantize_asym_blocks(
  codes: jnp.ndarray, scale: jnp.ndarray, minimum: jnp.ndarray, block_size
) -> jnp.ndarray:
  """Codes with per-block d and m -> flat float32 d * q + m (the product
  rounded before the sum, as NumPy computes it)."""
  n = codes.shape[0]
  d = scale.astype(jnp.float32)[:, None]
  q = _blocks(codes, block_size).astype(jnp.float32)
  product = _rounded(q * d, jnp.abs(d[:, 0]))
  return (product + minimum.astype(jnp.float32)[:, None]).reshape(-1)[:n]
