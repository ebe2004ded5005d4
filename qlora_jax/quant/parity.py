"""Bit-exactness against vectors that bitsandbytes produced.

Reads files in the layout of `make_bnb_ref.py` (cases `NAME/x`, `NAME/meta`,
`NAME/packed`, `NAME/absmax`, ... ; see `tests/fixtures/make_bnb_ref.py`) and
compares this codebase's quantizer with them case by case.
"""

import dataclasses

import jax.numpy as jnp
import numpy as np

from qlora_jax.quant import blockwise
from qlora_jax.quant.dynamic_map import DYNAMIC_MAP_SIGNED
from qlora_jax.quant.tensor import block_absmax, dequantize, quantize

# NumPy conversions (ml_dtypes for bfloat16) keep the host from compiling a
# convert per case; the inputs are already representable in their dtype.
_DTYPES = {0: np.float32, 1: jnp.bfloat16, 2: np.float16}
_QTYPES = {0: "nf4", 1: "fp4"}
# Reconstructed absmax may differ from bitsandbytes' by one step of the 8-bit
# map: at most this fraction of the group's absmax2.
DQ_ABSMAX_TOL = 0.015
# Share of 8-bit absmax codes identical to bitsandbytes', over all cases
# (bitsandbytes' CPU binary search has edge cases of its own near zero).
DQ_MIN_CODE_MATCH = 0.99


@dataclasses.dataclass
class CaseResult:
  name: str
  ok: bool
  reasons: list[str]
  q8_equal: int = 0  # identical 8-bit codes (groups with absmax2 > 0)
  q8_total: int = 0


def case_names(ref) -> list[str]:
  return sorted({k.split("/")[0] for k in ref.files if k.endswith("/meta")})


def _bits_equal(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  return a.astype(np.float32).view(np.uint32) == b.astype(np.float32).view(
    np.uint32
  )


def _values_equal(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  """Identical float32 values. +0 and -0 count as equal: bitsandbytes' own
  native dequantize returns either sign for the FP4 code 0b1000 ("-0")
  depending on the tensor."""
  return a.astype(np.float32) == b.astype(np.float32)


def check_case(ref, name: str) -> CaseResult:
  """Quantizes case `name` of `ref` and compares with bitsandbytes."""
  block_size, nested, dcode, qcode = (int(v) for v in ref[f"{name}/meta"])
  x = ref[f"{name}/x"].astype(_DTYPES[dcode])
  qt = quantize(x, _QTYPES[qcode], block_size, bool(nested), name=name)
  reasons = []
  packed = np.asarray(qt.codes)
  want_packed = ref[f"{name}/packed"].reshape(-1)
  if packed.shape != want_packed.shape:
    reasons.append(f"packed shape {packed.shape} != {want_packed.shape}")
  elif (n := int((packed != want_packed).sum())) > 0:
    reasons.append(f"{n}/{packed.size} packed bytes differ")
  deq = np.asarray(dequantize(qt)).astype(np.float32).reshape(-1)
  want_deq = ref[f"{name}/deq"].reshape(-1)
  result = CaseResult(name, True, reasons)
  if not nested:
    absmax = np.asarray(qt.absmax)
    want = ref[f"{name}/absmax"]
    if absmax.shape != want.shape or not _bits_equal(absmax, want).all():
      reasons.append("absmax differs")
    if (n := int((~_values_equal(deq, want_deq)).sum())) > 0:
      reasons.append(f"{n}/{deq.size} dequantized values differ")
  else:
    _check_double_quant(ref, name, qt, deq, want_deq, result)
  result.ok = not reasons
  return result


def _check_double_quant(ref, name, qt, deq, want_deq, result):
  reasons = result.reasons
  q8, want_q8 = np.asarray(qt.absmax), ref[f"{name}/absmax"]
  absmax2 = ref[f"{name}/absmax2"]
  offset = ref[f"{name}/offset"]
  want_absmax = DYNAMIC_MAP_SIGNED[want_q8] * np.repeat(
    absmax2, blockwise.DQ_GROUP
  )[: len(want_q8)] + np.float32(offset)
  ours = np.asarray(block_absmax(qt))
  if ours.shape != want_absmax.shape:
    reasons.append(f"absmax shape {ours.shape} != {want_absmax.shape}")
    return
  group_max = np.repeat(absmax2, blockwise.DQ_GROUP)[: len(want_q8)]
  err = np.abs(ours - want_absmax)
  if (err > DQ_ABSMAX_TOL * group_max).any():
    i = int(np.argmax(err / np.maximum(group_max, 1e-38)))
    reasons.append(
      f"reconstructed absmax of block {i} off by {err[i]:.3g} "
      f"(> {DQ_ABSMAX_TOL} x absmax2 {group_max[i]:.3g})"
    )
  counted = group_max > 0
  result.q8_total = int(counted.sum())
  result.q8_equal = int((q8 == want_q8)[counted].sum())
  same = _bits_equal(ours, want_absmax)
  per_elem = np.repeat(same, qt.block_size)[: deq.size]
  if (n := int((~_values_equal(deq, want_deq) & per_elem).sum())) > 0:
    reasons.append(
      f"{n} dequantized values differ where the reconstructed absmax is equal"
    )


@dataclasses.dataclass
class Report:
  cases: list[CaseResult]

  @property
  def q8_share(self) -> float:
    """Share of identical 8-bit codes over all cases (groups with absmax2>0)."""
    total = sum(c.q8_total for c in self.cases)
    return sum(c.q8_equal for c in self.cases) / total if total else 1.0

  @property
  def num_ok(self) -> int:
    return sum(c.ok for c in self.cases)

  @property
  def ok(self) -> bool:
    """Every case matches, and there was at least one case to check."""
    if not self.cases:
      return False
    return self.num_ok == len(self.cases) and self.q8_share >= DQ_MIN_CODE_MATCH


def run(ref) -> Report:
  """Checks every case of `ref` (an npz mapping)."""
  return Report([check_case(ref, name) for name in case_names(ref)])
