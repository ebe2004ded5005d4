"""Code tables: bitsandbytes' NF4/FP4, the NF-k and Int-k families, FP8.

References: the tables bitsandbytes 0.50.2 wrote into the trimmed fixture
(`nf4_code`, `fp4_code`), and the constructions of ../shared/REFERENCE.md
recomputed here in float64.
"""

import pathlib
import statistics

import ml_dtypes
import numpy as np
import pytest

from qlora_jax.quant import codebooks

REF = pathlib.Path(__file__).parent / "data" / "bnb_4bit_ref_small.npz"
FAMILY_BITS = (2, 3, 4, 5, 6, 8)


@pytest.fixture(scope="module")
def ref():
  with np.load(REF) as f:
    yield {k: f[k] for k in ("nf4_code", "fp4_code")}


def test_nf4_is_bitsandbytes_table_exactly(ref):
  np.testing.assert_array_equal(codebooks.NF4_VALUES, ref["nf4_code"])
  np.testing.assert_array_equal(
    codebooks.get_data_type("nf4").values, ref["nf4_code"]
  )


def test_normal_float_construction_reproduces_nf4_exactly(ref):
  # The QLoRA construction (offset 0.9677083, float32 linspace as torch).
  np.testing.assert_array_equal(
    codebooks.normal_float_values(4), ref["nf4_code"]
  )


def test_fp4_is_bitsandbytes_table_exactly(ref):
  np.testing.assert_array_equal(
    codebooks.get_data_type("fp4").values, ref["fp4_code"]
  )


def test_fp4_sign_bit_and_magnitudes():
  # REFERENCE.md: bit 3 is the sign, bits 2..0 index these magnitudes.
  mags = np.float32([0, 1 / 192, 2 / 3, 1, 1 / 3, 1 / 2, 1 / 6, 1 / 4])
  values = codebooks.get_data_type("fp4").values
  np.testing.assert_array_equal(values[:8], mags)
  np.testing.assert_array_equal(values[8:], -mags)


def _nf_float64(bits: int) -> np.ndarray:
  """The NF-k construction of REFERENCE.md, in float64."""
  n = 2**bits
  offset = 1.0 - 0.5 * (1.0 / (2 * n) + 1.0 / (2 * (n - 1)))
  ppf = statistics.NormalDist().inv_cdf
  pos = [ppf(p) for p in np.linspace(offset, 0.5, n // 2 + 1)[:-1]]
  neg = [-ppf(p) for p in np.linspace(offset, 0.5, n // 2)[:-1]]
  v = np.sort(np.array(pos + neg + [0.0]))
  return v / v.max()


@pytest.mark.parametrize("bits", FAMILY_BITS)
def test_nf_k_levels(bits):
  v = codebooks.get_data_type(f"nf{bits}").values
  half = 2 ** (bits - 1)
  assert v.dtype == np.float32 and v.shape == (2**bits,)
  assert np.all(np.diff(v) > 0), "strictly increasing"
  assert v[0] == -1.0 and v[-1] == 1.0
  # One exact zero, 2**(k-1) positive and 2**(k-1) - 1 negative levels.
  assert np.flatnonzero(v == 0.0).tolist() == [half - 1]
  assert (v > 0).sum() == half and (v < 0).sum() == half - 1
  # float32 linspace vs float64: a few float32 ulps (2e-6 at k = 8).
  np.testing.assert_allclose(v, _nf_float64(bits), rtol=0, atol=2e-6)


@pytest.mark.parametrize("bits", FAMILY_BITS)
def test_int_k_levels(bits):
  dt = codebooks.get_data_type(f"int{bits}")
  m = 2 ** (bits - 1) - 1
  # 2**k - 1 used levels j / m, j in [-m, m]; the last code is unused.
  np.testing.assert_array_equal(
    dt.encode_values, np.arange(-m, m + 1, dtype=np.float32) / np.float32(m)
  )
  assert len(dt.encode_codes) == 2**bits - 1
  assert dt.values[dt.zero_code] == 0.0
  assert dt.zero_code == m


def test_int8_is_int_8():
  assert codebooks.get_data_type("int8") == codebooks.get_data_type("INT8")
  assert codebooks.get_data_type("int8").bits == 8


def test_fp8_is_e4m3_over_448():
  dt = codebooks.get_data_type("fp8")
  f8 = np.arange(256, dtype=np.uint8).view(ml_dtypes.float8_e4m3fn)
  finite = np.isfinite(f8.astype(np.float32))
  assert len(dt.encode_codes) == finite.sum() == 254  # two NaN patterns
  np.testing.assert_array_equal(
    dt.values[finite], f8[finite].astype(np.float32) / np.float32(448)
  )
  assert dt.encode_values.min() == -1.0 and dt.encode_values.max() == 1.0


@pytest.mark.parametrize("name", ["nf4", "fp4", "nf3", "int5", "fp8"])
def test_thresholds_are_float32_midpoints(name):
  dt = codebooks.get_data_type(name)
  v = dt.encode_values
  want = (v[1:] + v[:-1]) / np.float32(2)
  assert dt.thresholds.dtype == np.float32
  np.testing.assert_array_equal(dt.thresholds, want)


def test_zero_codes():
  # What 0.0 (and bitsandbytes' odd-count padding) encodes to.
  assert codebooks.get_data_type("nf4").zero_code == 7
  assert codebooks.get_data_type("fp4").zero_code == 0
  assert codebooks.get_data_type("int3").zero_code == 3


def test_unknown_names_raise():
  for name in ("nf7", "int1", "float4", "nf", "", "fp16"):
    with pytest.raises(ValueError, match="unknown data type"):
      codebooks.get_data_type(name)
  with pytest.raises(ValueError, match="must be a string"):
    codebooks.get_data_type(4)
