"""The signed 8-bit dynamic map of double quantization.

References: the `code2` tables bitsandbytes 0.50.2 wrote into the trimmed
fixture, and the construction in dynamic_map.py's docstring in float64.
"""

import pathlib

import numpy as np

from qlora_jax.quant.dynamic_map import DYNAMIC_MAP_SIGNED

REF = pathlib.Path(__file__).parent / "data" / "bnb_4bit_ref_small.npz"


def _construction_float64() -> np.ndarray:
  """For e in 0..6: midpoints of 2**e + 1 fractions in [0.1, 1] times
  +-10**(e - 6); plus 0 and 1."""
  values = [0.0, 1.0]
  for e in range(7):
    fractions = np.linspace(0.1, 1.0, 2**e + 1)
    mids = (fractions[:-1] + fractions[1:]) / 2 * 10.0 ** (e - 6)
    values += list(mids) + list(-mids)
  return np.sort(np.array(values))


def test_equals_bitsandbytes_code2():
  with np.load(REF) as ref:
    tables = [ref[k] for k in ref.files if k.endswith("/code2")]
  assert len(tables) >= 10
  for table in tables:
    np.testing.assert_array_equal(DYNAMIC_MAP_SIGNED, table)


def test_within_one_float32_ulp_of_construction():
  want = _construction_float64().astype(np.float32)
  got = DYNAMIC_MAP_SIGNED
  assert got.dtype == np.float32 and got.shape == want.shape == (256,)
  # Same signs, so the int32 bit patterns count float32 steps apart.
  assert np.array_equal(np.sign(got), np.sign(want))
  steps = np.abs(got.view(np.int32).astype(np.int64) - want.view(np.int32))
  assert steps.max() <= 1
  # torch's float32 linspace rounds some values differently: not all equal.
  assert 0 < (steps == 1).sum() < 256


def test_shape_of_the_map():
  d = DYNAMIC_MAP_SIGNED
  assert np.all(np.diff(d) > 0)
  assert d[0] == np.float32(-0.99296874) and d[-1] == 1.0
  assert (d == 0.0).sum() == 1 and (d == 1.0).sum() == 1
