"""Bit-exactness with bitsandbytes on the trimmed reference file.

tests/data/bnb_4bit_ref_small.npz holds 35 cases that bitsandbytes 0.50.2
produced on the CPU (tests/fixtures/trim_bnb_ref.py cut it from the shared
324-case file). The matching rules and tolerances are those of issue 2, in
qlora_jax/quant/parity.py.
"""

import pathlib
import re

import numpy as np
import pytest
from absl import flags
from absl import logging as absl_logging
from absl.testing import flagsaver

from experiments import bnb_parity
from qlora_jax.quant import parity

REF = pathlib.Path(__file__).parent / "data" / "bnb_4bit_ref_small.npz"
INPUTS = {
  "randn_4096",
  "odd_1000",
  "odd_33x77",
  "zero_block",
  "nf4_midpoints",
  "heavy_tail",
  "tiny",
  "linspace",
}


@pytest.fixture(scope="module")
def report() -> parity.Report:
  with np.load(REF) as ref:
    return parity.run(ref)


def test_every_case_matches(report):
  failing = {c.name: c.reasons for c in report.cases if not c.ok}
  assert not failing
  assert len(report.cases) == 35
  # Identical 8-bit absmax codes over all cases (issue 2: at least 99%).
  assert report.q8_share >= parity.DQ_MIN_CODE_MATCH == 0.99
  assert sum(c.q8_total for c in report.cases) > 500
  assert report.ok


def test_fixture_covers_every_axis():
  with np.load(REF) as ref:
    names = parity.case_names(ref)
    assert {"nf4_code", "fp4_code"} <= set(ref.files)
  parts = [n.split(".") for n in names]
  assert INPUTS <= {p[0] for p in parts}
  assert {p[1] for p in parts} == {"f32", "bf16", "f16"}
  assert {p[2] for p in parts} == {"nf4", "fp4"}
  assert {p[3] for p in parts} == {"b64", "b128", "b256"}
  assert {p[4] for p in parts} == {"dq0", "dq1"}
  # Every (dtype, block size) pair, and ties in float32 NF4.
  assert len({(p[1], p[3]) for p in parts}) == 9
  assert "nf4_midpoints.f32.nf4.b64.dq0" in names


def _run_main(path: pathlib.Path, capsys) -> tuple[int, list[str]]:
  """experiments.bnb_parity's main, in this process (compiles are shared)."""
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()
  verbosity = absl_logging.get_verbosity()
  try:
    with flagsaver.flagsaver(ref=str(path)), pytest.raises(SystemExit) as e:
      bnb_parity.main([])
  finally:
    absl_logging.set_verbosity(verbosity)  # main quiets absl
  return e.value.code, capsys.readouterr().out.strip().splitlines()


def _matched(lines: list[str]) -> tuple[int, int]:
  m = re.fullmatch(r"bnb parity: (\d+)/(\d+) cases match", lines[-1])
  assert m, lines[-1]
  return int(m.group(1)), int(m.group(2))


def test_main_passes_on_the_reference(capsys):
  code, lines = _run_main(REF, capsys)
  assert code == 0
  assert _matched(lines) == (35, 35)
  assert not [line for line in lines if line.startswith("FAIL")]


def _corrupted_copy(tmp_path: pathlib.Path, edit) -> pathlib.Path:
  with np.load(REF) as ref:
    arrays = {k: ref[k].copy() for k in ref.files}
  edit(arrays)
  out = tmp_path / "corrupted.npz"
  np.savez(out, **arrays)
  return out


def test_main_fails_on_one_flipped_packed_byte(tmp_path, capsys):
  case = "odd_1000.bf16.nf4.b128.dq0"

  def flip(arrays):
    arrays[f"{case}/packed"][17] ^= 0xFF

  code, lines = _run_main(_corrupted_copy(tmp_path, flip), capsys)
  assert code == 1
  assert _matched(lines) == (34, 35)
  assert f"FAIL {case}: 1/500 packed bytes differ" in lines


@pytest.mark.parametrize(
  "case,key,reason",
  [
    ("randn_4096.f32.nf4.b64.dq0", "absmax", "absmax differs"),
    ("tiny.f32.nf4.b64.dq0", "deq", "1/4096 dequantized values differ"),
    ("randn_4096.f32.fp4.b64.dq1", "absmax2", "reconstructed absmax of"),
  ],
)
def test_check_case_catches_each_difference(tmp_path, case, key, reason):
  def nudge(arrays):
    a = arrays[f"{case}/{key}"].reshape(-1)
    a[0] = np.nextafter(a[0], np.float32(np.inf)) * (
      1.1 if key == "absmax2" else 1
    )

  with np.load(_corrupted_copy(tmp_path, nudge)) as ref:
    result = parity.check_case(ref, case)
  assert not result.ok
  assert any(reason in r for r in result.reasons), result.reasons


def test_main_fails_on_a_file_with_no_case(tmp_path, capsys):
  empty = tmp_path / "unrelated.npz"
  np.savez(empty, weights=np.zeros(4))
  code, lines = _run_main(empty, capsys)
  assert code == 1  # nothing checked is not a pass
  assert _matched(lines) == (0, 0)
  assert "holds no case to check" in lines[-2]
