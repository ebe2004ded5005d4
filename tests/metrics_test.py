"""metrics.jsonl of a resumed run: one record per step."""

import json

import pytest

from qlora_jax.engine.metrics import MetricsWriter


def _lines(path):
  return [json.loads(line) for line in path.read_text().splitlines()]


def _write_steps(workdir, steps):
  writer = MetricsWriter(workdir, None)
  writer.write("eval", 0, {"loss": 9.0})
  for step in steps:
    writer.write("train", step, {"loss": 1.0 / step})
    if step % 2 == 0:
      writer.write("eval", step, {"loss": 2.0 / step})
  writer.close()


def test_a_resumed_run_drops_the_records_it_redoes(tmp_path):
  _write_steps(tmp_path, range(1, 6))  # killed after step 5, saved at 2
  writer = MetricsWriter(tmp_path, 2)
  for step in (3, 4):
    writer.write("train", step, {"loss": 0.5})
  writer.close()
  keys = [(r["kind"], r["step"]) for r in _lines(tmp_path / "metrics.jsonl")]
  assert keys == [
    ("eval", 0),
    ("train", 1),
    ("train", 2),
    ("eval", 2),
    ("train", 3),
    ("train", 4),
  ]


def test_a_run_from_no_checkpoint_starts_its_records_again(tmp_path):
  _write_steps(tmp_path, range(1, 4))  # killed before its first checkpoint
  _write_steps(tmp_path, range(1, 3))
  keys = [(r["kind"], r["step"]) for r in _lines(tmp_path / "metrics.jsonl")]
  assert keys == [("eval", 0), ("train", 1), ("train", 2), ("eval", 2)]


def test_a_bad_line_is_named(tmp_path):
  (tmp_path / "metrics.jsonl").write_text('{"kind": "train", "step": 1}\nx\n')
  with pytest.raises(ValueError, match=r"metrics.jsonl:2: not a metrics"):
    MetricsWriter(tmp_path, 1)
