"""Code tables of the k-bit data types: NF-k, Int-k, FP4 (bitsandbytes), FP8.

A data type maps a k-bit code to a value in [-1, 1]; a tensor is stored as
codes plus one absmax scale per block. Encoding picks, for a scaled value, the
code whose value is nearest, ties going to the lower value (bitsandbytes'
rule: the code is the number of midpoints strictly below the value).

The asymmetric integer types `int<k>_asym` are the exception: a block
stores a scale d and a minimum m (float16) and code q in [0, 2**k - 1]
stands for d * q + m (GGML's Q4_1 for k = 4 and blocks of 32; see
`blockwise.quantize_asym_blocks`). Their `values` are the integers q.
"""

import dataclasses
import functools
import re
import statistics

import ml_dtypes
import numpy as np

# bitsandbytes' NF4 table (code 0..15), float32, exact zero at code 7.
NF4_VALUES = np.array(
  [
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
  ],
  np.float32,
)

# bitsandbytes' FP4 (E2M1 variant): bit 3 is the sign, bits 2..0 index these.
_FP4_MAGNITUDES = (0.0, 1 / 192, 2 / 3, 1.0, 1 / 3, 1 / 2, 1 / 6, 1 / 4)

# Largest finite float8_e4m3fn value; FP8 codes are the e4m3 bit patterns of
# the block-scaled value times this.
FP8_E4M3_MAX = 448.0

SUPPORTED_BITS = (2, 3, 4, 5, 6, 8)
_NAME_RE = re.compile(r"^(nf|int)([0-9])(_asym)?$")


@dataclasses.dataclass(frozen=True)
class DataType:
  """A k-bit data type.

  Attributes:
    name: canonical name ("nf4", "int3", "fp4", "fp8", ...).
    bits: bits per code.
    values: float32[2**bits], the value of each code (unused codes are 0).
    encode_values: float32, the values encoding may choose, sorted ascending.
    encode_codes: uint8, the code of each entry of `encode_values`.
    asymmetric: codes stand for d * q + m per block (`int<k>_asym`), not
      table value times block absmax.
  """

  name: str
  bits: int
  values: np.ndarray = dataclasses.field(repr=False, compare=False)
  encode_values: np.ndarray = dataclasses.field(repr=False, compare=False)
  encode_codes: np.ndarray = dataclasses.field(repr=False, compare=False)
  asymmetric: bool = False

  @property
  def thresholds(self) -> np.ndarray:
    """Float32 midpoints between neighbouring encodable values."""
    v = self.encode_values
    return ((v[1:] + v[:-1]) / np.float32(2)).astype(np.float32)

  @property
  def zero_code(self) -> int:
    """The code that a value of exactly 0.0 encodes to."""
    i = int(np.searchsorted(self.thresholds, np.float32(0.0), side="left"))
    return int(self.encode_codes[i])

  @property
  def uses_cast(self) -> bool:
    """True when encoding is a float8 cast rather than a table search."""
    return self.name == "fp8"


def _linspace_f32(start: float, end: float, steps: int) -> np.ndarray:
  """float32 linspace computed as torch computes it (halves from each end)."""
  start32, end32 = np.float32(start), np.float32(end)
  step = (end32 - start32) / np.float32(steps - 1)
  i = np.arange(steps)
  head = start32 + step * i.astype(np.float32)
  tail = end32 - step * (steps - 1 - i).astype(np.float32)
  return np.where(i < steps // 2, head, tail).astype(np.float32)


def normal_float_values(bits: int) -> np.ndarray:
  """NF-k: quantiles of N(0, 1), normalised to [-1, 1], with an exact zero.

  The construction of the QLoRA paper (bitsandbytes' `create_normal_map` for
  k = 4, offset 0.9677083), extended to 2**k levels: 2**(k-1) positive
  quantiles, 2**(k-1) - 1 negative ones, and 0.
  """
  n = 2**bits
  # bitsandbytes writes the k = 4 offset with seven decimals: 0.9677083.
  offset = round(1.0 - 0.5 * (1.0 / (2 * n) + 1.0 / (2 * (n - 1))), 7)
  ppf = statistics.NormalDist().inv_cdf
  pos = [ppf(float(p)) for p in _linspace_f32(offset, 0.5, n // 2 + 1)[:-1]]
  neg = [-ppf(float(p)) for p in _linspace_f32(offset, 0.5, n // 2)[:-1]]
  v = np.sort(np.array(pos + neg + [0.0], np.float32))
  return (v / v.max()).astype(np.float32)


def _table_type(name: str, bits: int, values: np.ndarray, used: np.ndarray):
  order = np.argsort(values[used], kind="stable")
  codes = np.flatnonzero(used)[order].astype(np.uint8)
  return DataType(name, bits, values, values[codes], codes)


@functools.cache
def get_data_type(name: str) -> DataType:
  """Returns the DataType called `name`; raises ValueError for unknown names."""
  if not isinstance(name, str):
    raise ValueError(f"data type must be a string, got {name!r}")
  key = name.lower()
  if key == "fp4":
    mags = np.array(_FP4_MAGNITUDES, np.float32)
    # Code 8 is "-0"; its value is stored as +0.0, as in bitsandbytes' table.
    values = np.concatenate([mags, -mags]).astype(np.float32) + np.float32(0)
    return _table_type("fp4", 4, values, np.ones(16, bool))
  if key == "fp8":
    bit_patterns = np.arange(256, dtype=np.uint8)
    f8 = bit_patterns.view(ml_dtypes.float8_e4m3fn).astype(np.float32)
    used = np.isfinite(f8)
    values = np.where(used, f8 / np.float32(FP8_E4M3_MAX), 0.0)
    return _table_type("fp8", 8, values.astype(np.float32), used)
  m = _NAME_RE.match(key)
  if (
    m is None
    or int(m.group(2)) not in SUPPORTED_BITS
    or (m.group(3) and m.group(1) != "int")
  ):
    raise ValueError(
      f"unknown data type {name!r}: expected 'nf4', 'fp4', 'fp8', or "
      f"'nf<k>' / 'int<k>' / 'int<k>_asym' with k in {SUPPORTED_BITS}"
    )
  family, bits = m.group(1), int(m.group(2))
  n = 2**bits
  if m.group(3):  # asymmetric: code q is the integer q
    values = np.arange(n, dtype=np.float32)
    codes = np.arange(n, dtype=np.uint8)
    return DataType(key, bits, values, values, codes, asymmetric=True)
  if family == "nf":
    values = NF4_VALUES.copy() if bits == 4 else normal_float_values(bits)
    return _table_type(key, bits, values, np.ones(n, bool))
  # Int-k: symmetric, levels j / m for j in [-m, m], m = 2**(k-1) - 1; the
  # last code is unused so that zero is exact.
  m_ = 2 ** (bits - 1) - 1
  values = np.zeros(n, np.float32)
  values[: 2 * m_ + 1] = np.arange(-m_, m_ + 1, dtype=np.float32) / m_
  used = np.arange(n) < 2 * m_ + 1
  return _table_type(key, bits, values, used)
