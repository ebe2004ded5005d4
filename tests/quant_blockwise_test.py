"""Blockwise scaling, encoding and double quantization against a NumPy port.

The reference below implements the rules of ../shared/REFERENCE.md directly
in NumPy float32 (whose division and multiplication are IEEE, with no fused
multiply-add): full blocks scaled by a reciprocal, a final partial block by a
division, the code is the number of float32 midpoints strictly below the
scaled value; double quantization divides by the group absmax and searches
the dynamic map as bitsandbytes' CPU code does. Codes must agree exactly.
"""

import pathlib

import jax
import ml_dtypes
import numpy as np
import pytest

from qlora_jax import quant
from qlora_jax.quant import blockwise, codebooks, packing
from qlora_jax.quant.dynamic_map import DYNAMIC_MAP_SIGNED

F32 = np.float32
FIXTURE = pathlib.Path(__file__).parent / "data" / "bnb_4bit_ref_small.npz"
TABLE_TYPES = (
  "nf4",
  "fp4",
  "nf2",
  "nf3",
  "nf5",
  "nf6",
  "nf8",
  "int2",
  "int3",
  "int4",
  "int5",
  "int6",
  "int8",
)


def _scaled_reference(x: np.ndarray, block_size: int):
  n = len(x)
  nb = -(-n // block_size)
  xb = np.zeros(nb * block_size, F32)
  xb[:n] = x
  xb = xb.reshape(nb, block_size)
  absmax = np.abs(xb).max(axis=1)
  denom = np.maximum(absmax, F32(1e-38))[:, None]
  scaled = xb * (F32(1) / denom)
  if n % block_size:
    scaled[-1] = xb[-1] / denom[-1]
  return np.clip(scaled, -1, 1).reshape(-1)[:n], absmax


def _codes_reference(x: np.ndarray, name: str, block_size: int):
  scaled, absmax = _scaled_reference(x, block_size)
  dt = codebooks.get_data_type(name)
  if dt.uses_cast:
    f8 = (scaled * F32(448)).astype(ml_dtypes.float8_e4m3fn)
    return f8.view(np.uint8), absmax
  idx = np.searchsorted(dt.thresholds, scaled, side="left")
  return dt.encode_codes[idx], absmax


def _neighbours(v: np.ndarray) -> np.ndarray:
  """v and its two float32 neighbours. A subnormal neighbour (of 0) becomes
  the smallest normal: XLA on CPU flushes subnormals to zero, NumPy does
  not, and bitsandbytes' rules say nothing about them."""
  out = np.concatenate([v, np.nextafter(v, F32(2)), np.nextafter(v, F32(-2))])
  tiny = np.finfo(F32).tiny
  sub = (out != 0) & (np.abs(out) < tiny)
  return np.where(sub, np.sign(out) * tiny, out).astype(F32)


def _adversarial(n: int, name: str, seed: int) -> np.ndarray:
  """Blocks whose absmax is 1.0 (so scaling is exact) holding every
  threshold and both its float32 neighbours, then n Gaussian values."""
  thr = codebooks.get_data_type(name).thresholds
  if codebooks.get_data_type(name).uses_cast:
    thr = np.linspace(-1, 1, 101, dtype=F32)
  ties = _neighbours(thr)
  ties = np.pad(ties, (0, -len(ties) % 63)).reshape(-1, 63)
  ones = np.ones((len(ties), 1), F32)
  rng = np.random.default_rng(seed)
  x = rng.standard_normal(n).astype(F32)
  return np.concatenate([np.hstack([ties, ones]).reshape(-1), x])


@pytest.mark.parametrize("name", TABLE_TYPES + ("fp8",))
def test_codes_match_numpy_reference(name):
  block_size = 64
  x = _adversarial(1000, name, seed=len(name))  # a partial final block
  assert len(x) % block_size
  qt = quant.quantize(x, name, block_size)
  bits = codebooks.get_data_type(name).bits
  codes = packing.unpack(qt.codes, bits, len(x))
  want_codes, want_absmax = _codes_reference(x, name, block_size)
  np.testing.assert_array_equal(np.asarray(qt.absmax), want_absmax)
  mismatch = np.flatnonzero(np.asarray(codes) != want_codes)
  assert mismatch.size == 0, (name, mismatch[:5], x[mismatch[:5]])


def test_final_partial_block_is_divided_full_blocks_multiplied():
  # Found by search: for this absmax a and value x, x / a is exactly the
  # NF4 midpoint between codes 2 and 3 while x * (1 / a) rounds above it.
  a, x = F32(0.5578467), F32(-0.25660685)
  mid = codebooks.get_data_type("nf4").thresholds[2]
  assert x / a == mid and x * (F32(1) / a) > mid
  # ... and for these, x * (1 / a) is the midpoint between codes 13 and 14
  # while x / a is above it.
  a2, x2 = F32(0.9459105), F32(0.60801893)
  mid2 = codebooks.get_data_type("nf4").thresholds[13]
  assert x2 * (F32(1) / a2) == mid2 and x2 / a2 > mid2

  full = np.zeros(64, F32)
  full[:2] = a2, x2
  partial = np.array([a, x], F32)
  qt = quant.quantize(np.concatenate([full, partial]), "nf4", 64)
  codes = np.asarray(packing.unpack(qt.codes, 4, 66))
  # Ties go to the lower code: the full block's tie is under the reciprocal,
  # the partial block's under the division.
  assert codes[1] == 13 and codes[65] == 2


def test_fp4_tiny_values_keep_bitsandbytes_sign_codes():
  # bitsandbytes 0.50.2 (CPU), in every FP4 case of the fixture: a positive
  # value too small to round away from zero gets code 0b1000, a negative one
  # code 0 (../shared/REFERENCE.md says the reverse), 0.0 gets code 0: its
  # sorted search puts code 0 before code 8 for the two zeros.
  with np.load(FIXTURE) as ref:
    names = [k[:-5] for k in ref.files if ".fp4." in k and k.endswith("/meta")]
    seen = {"pos": set(), "neg": set()}
    for name in names:
      block_size, nested = ref[f"{name}/meta"][:2]
      x, packed = ref[f"{name}/x"], ref[f"{name}/packed"]
      if nested:
        continue
      scale = np.repeat(ref[f"{name}/absmax"], block_size)[: len(x)]
      codes = np.stack([packed >> 4, packed & 15], -1).reshape(-1)[: len(x)]
      tiny = np.abs(x) < scale / 384
      seen["pos"] |= set(codes[tiny & (x > 0)].tolist())
      seen["neg"] |= set(codes[tiny & (x < 0)].tolist())
  assert seen == {"pos": {8}, "neg": {0}}
  qt = quant.quantize(np.float32([1.0, 1e-3, -1e-3, 0.0]), "fp4", 64)
  assert np.asarray(packing.unpack(qt.codes, 4, 4)).tolist() == [3, 8, 0, 0]


def test_zero_block_scales_to_zero():
  x = np.concatenate([np.zeros(64, F32), np.linspace(-1, 1, 64, dtype=F32)])
  qt = quant.quantize(x, "fp4", 64)
  codes = np.asarray(packing.unpack(qt.codes, 4, 128))
  assert np.asarray(qt.absmax)[0] == 0 and np.all(codes[:64] == 0)
  assert np.all(np.asarray(quant.dequantize(qt))[:64] == 0)


@pytest.mark.parametrize("name", ["nf8", "int8"])
def test_grid_search_equals_sorted_search(name):
  thr = codebooks.get_data_type(name).thresholds
  assert blockwise._bucket_tables(thr) is not None, "uses the grid"
  v = np.concatenate([_neighbours(thr), np.linspace(-1, 1, 20001, dtype=F32)])
  count = jax.jit(lambda v: blockwise._count_below(v, thr))
  np.testing.assert_array_equal(
    np.asarray(count(v)), np.searchsorted(thr, v, side="left")
  )


def test_binary_search_on_the_dynamic_map():
  table = DYNAMIC_MAP_SIGNED.copy()
  assert blockwise._bucket_tables(table) is None, "too dense for a grid"
  v = np.clip(_neighbours(table), -1, 1)
  count = jax.jit(lambda v: blockwise._count_below(v, table, inclusive=True))
  np.testing.assert_array_equal(
    np.asarray(count(v)), np.searchsorted(table, v, side="right")
  )


def _double_quant_reference(absmax: np.ndarray, offset: np.float32):
  """bitsandbytes' CPU 8-bit step (REFERENCE.md), given the offset."""
  n = len(absmax)
  ng = -(-n // 256)
  centred = np.zeros(ng * 256, F32)
  centred[:n] = absmax - offset
  centred = centred.reshape(ng, 256)
  absmax2 = np.abs(centred).max(axis=1)
  normed = centred / absmax2[:, None]
  table = DYNAMIC_MAP_SIGNED.copy()
  table[0] = -1.0
  left = np.searchsorted(table, normed, side="right") - 1
  right = np.minimum(left + 1, 255)
  closer = np.abs(normed - table[right]) < np.abs(normed - table[left])
  q8 = np.where((left < 255) & closer, right, left)
  return q8.reshape(-1)[:n].astype(np.uint8), absmax2


def test_double_quant_matches_numpy_reference():
  rng = np.random.default_rng(7)
  # 700 blocks: three groups of 256, the last one partial.
  x = (rng.standard_normal(64 * 700) * rng.uniform(0.1, 3, 64 * 700)).astype(
    F32
  )
  plain = quant.quantize(x, "nf4", 64)
  qt = quant.quantize(x, "nf4", 64, double_quant=True)
  np.testing.assert_array_equal(np.asarray(qt.codes), np.asarray(plain.codes))
  absmax = np.asarray(plain.absmax)
  offset = np.asarray(qt.offset)
  # The offset is a float32 mean; summation order moves its last bits only.
  np.testing.assert_allclose(
    offset, absmax.astype(np.float64).mean(), rtol=1e-6
  )
  q8, absmax2 = _double_quant_reference(absmax, offset)
  np.testing.assert_array_equal(np.asarray(qt.absmax2), absmax2)
  np.testing.assert_array_equal(np.asarray(qt.absmax), q8)
  # Reconstruction code2[q8] * absmax2 + offset, rounded twice (no FMA).
  scale = np.repeat(absmax2, 256)[: len(q8)]
  want = (DYNAMIC_MAP_SIGNED[q8] * scale).astype(F32) + offset
  np.testing.assert_array_equal(np.asarray(quant.block_absmax(qt)), want)
