"""Checks the quantizer against bitsandbytes' own vectors.

python -m experiments.bnb_parity --ref tests/data/bnb_4bit_ref_small.npz

The file's layout is that of `tests/fixtures/make_bnb_ref.py`. Prints one line
per failing case, the share of identical 8-bit absmax codes, and
`bnb parity: M/N cases match`; exits non-zero unless every case matches.
"""

import sys

import numpy as np
from absl import flags

from qlora_jax.engine import cli
from qlora_jax.quant import parity

_REF = flags.DEFINE_string("ref", None, "npz file of bitsandbytes vectors.")
flags.mark_flag_as_required("ref")


def main(argv):
  del argv
  with np.load(_REF.value) as ref:
    report = parity.run(ref)
  for case in report.cases:
    if not case.ok:
      print(f"FAIL {case.name}: {'; '.join(case.reasons)}")
  total = sum(c.q8_total for c in report.cases)
  print(
    f"identical 8-bit absmax codes: {report.q8_share:.2%} of {total} "
    f"(need {parity.DQ_MIN_CODE_MATCH:.0%})"
  )
  if not report.cases:
    print(f"bnb parity: {_REF.value} holds no case to check (no '*/meta' keys)")
  print(f"bnb parity: {report.num_ok}/{len(report.cases)} cases match")
  sys.exit(0 if report.ok else 1)


if __name__ == "__main__":
  cli.run(main)
