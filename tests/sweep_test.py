"""Sweeps: run, resume, record failures, one sweep per folder at a time;
tables equal the points' metrics."""

import json
import math
import pathlib
import shutil

import pytest

from configs import (
  default,
  table2_finetune,
  table3_rank,
  table4_bits,
  table5_cost,
)
from qlora_jax.ablations import figures, results, sweep, tables
from qlora_jax.engine import outputs
from qlora_jax.engine.metrics import read_metrics
from tests import tiny_config

TABLE = {
  "title": "tiny",
  "rows": ["method"],
  "metrics": [["accuracy", "accuracy (%)", "pct"], ["loss", "loss", "f4"]],
  "figures": [{"kind": "curves", "file": "curves.png", "metric": "loss"}],
}


def _table_cells(markdown: str) -> dict[str, list[str]]:
  rows = {}
  for line in markdown.splitlines():
    if line.startswith("| ") and not line.startswith("| method"):
      cells = [c.strip() for c in line.strip("|").split("|")]
      rows[cells[0]] = cells[1:]
  return rows


def test_sweep_runs_resumes_records_failures_and_renders(tmp_path):
  tiny_config.write_dataset(tmp_path / "data")
  config = tiny_config.get_config(str(tmp_path / "data"))
  config.train.steps = 2
  config.train.eval_every = 2
  points = [
    {"method": "a", "lora.rank": 2, "train.seed": 0},
    {"method": "a", "lora.rank": 2, "train.seed": 1},
    {"method": "bad", "lora.targets": "no_such_layer"},
  ]
  out = tmp_path / "sweep"
  lines = []
  first = sweep.run_sweep(config, points, out, TABLE, echo=lines.append)
  names = [
    sweep.Point(
      {k: v for k, v in p.items() if "." not in k},
      {k: v for k, v in p.items() if "." in k},
    ).name
    for p in points
  ]
  assert [first[n] for n in names] == ["done", "done", "failed"]
  assert any("FAILED" in line and "no_such_layer" in line for line in lines)
  assert lines[-1].startswith("sweep: 2/3 points done")
  slugs = [sweep.points_of(points)[i].slug for i in range(3)]
  error = (out / "points" / slugs[2] / "error.txt").read_text()
  assert "lora.targets" in error

  # Delete one finished point: the next run redoes it and skips the other.
  shutil.rmtree(out / "points" / slugs[1])
  lines.clear()
  second = sweep.run_sweep(config, points, out, TABLE, echo=lines.append)
  assert lines[0].endswith("done, skipped") and "running" in lines[1]
  assert [second[n] for n in names] == ["done", "done", "failed"]

  written = tables.write(out)
  first_bytes = [p.read_bytes() for p in written]
  assert [p.read_bytes() for p in tables.write(out)] == first_bytes
  markdown = written[0].read_text()
  assert "not in the table" in markdown and slugs[2] in markdown
  # The table's numbers are the mean of the points' final evals and the
  # half-width of its 95% Student t interval.
  evals = []
  for slug in slugs[:2]:
    records = read_metrics(out / "points" / slug / "metrics.jsonl")
    evals.append([r for r in records if r["kind"] == "eval"][-1])
  acc = [e["accuracy"] for e in evals]
  loss = [e["loss"] for e in evals]
  # By hand: the mean of two values; their sample std is |a - b| / sqrt(2),
  # so the half-width t(0.975, 1) * std / sqrt(2) is 12.706205 |a - b| / 2.
  mean_acc, half_acc = (
    (acc[0] + acc[1]) / 2,
    12.706205 * abs(acc[0] - acc[1]) / 2,
  )
  mean_loss = (loss[0] + loss[1]) / 2
  half_loss = 12.706205 * abs(loss[0] - loss[1]) / 2
  cells = _table_cells(markdown)["a"]
  assert cells[0] == f"{100 * mean_acc:.1f} ± {100 * half_acc:.1f}"
  assert cells[1] == f"{mean_loss:.4f} ± {half_loss:.4f}"
  # n, and the seeds whose loss is above a uniform guess's (ln 2 classes,
  # the untrained classifier's: these runs make no step-0 evaluation).
  bad = sum(v > math.log(2) for v in loss)
  assert cells[-1] == (f"2 ({bad} diverged)" if bad else "2")
  final = json.loads(
    (out / "points" / slugs[0] / "final_metrics.json").read_text()
  )
  assert final["accuracy"] == acc[0]
  assert (written[0].parent / "curves.png").stat().st_size > 0
  assert "\\begin{tabular}" in written[1].read_text()


def test_overrides_keep_types_but_targets_take_lists():
  base = default.get_config()
  c = sweep.apply_overrides(
    base, {"lora.targets": ["query", "value"], "lora.rank": 4}
  )
  assert c.lora.targets == ["query", "value"] and c.lora.rank == 4
  assert base.lora.targets == "all-linear"  # the base config is untouched
  with pytest.raises(TypeError):
    sweep.apply_overrides(base, {"lora.rank": "four"})
  with pytest.raises(ValueError, match="no config field 'rnak'"):
    sweep.apply_overrides(base, {"lora.rnak": 4})
  # Every point of the committed table configs applies to its base config.
  for module in (table2_finetune, table3_rank, table4_bits, table5_cost):
    for point in module.get_sweep():
      overrides = {k: v for k, v in point.items() if "." in k}
      sweep.apply_overrides(module.get_config(), overrides)


def test_committed_results_are_the_points_of_their_configs():
  # Each committed sweep holds exactly its config's points, in its order.
  root = pathlib.Path(__file__).resolve().parent.parent / "results"
  for module, name in (
    (table2_finetune, "table2"),
    (table3_rank, "table3"),
    (table4_bits, "table4"),
    (table5_cost, "table5"),
  ):
    slugs = [p.slug for p in sweep.points_of(module.get_sweep())]
    order = json.loads((root / name / "order.json").read_text())
    assert order == slugs, name
    for slug in slugs:
      point = json.loads(
        (root / name / "points" / slug / "point.json").read_text()
      )
      want = sweep.points_of(module.get_sweep())[slugs.index(slug)]
      assert point == {"labels": want.labels, "overrides": want.overrides}


def test_xy_figure_lines_join_series_keys_and_average_seeds(tmp_path):
  def point(base, adapter, seed, accuracy):
    keys = {"base": base, "bits": int(base[-1]), "adapter": adapter}
    keys[results.SEED_KEY] = seed
    return {"keys": keys, "metrics": {"accuracy": accuracy}}

  points = [
    point("nf2", "r=4", 0, 0.6),
    point("nf2", "r=4", 1, 0.8),
    point("nf3", "r=4", 0, 0.75),
    point("int2", "r=4", 0, 0.5),
    point("nf2", "r=16", 0, 0.9),
  ]
  spec = {"title": "t", "rows": ["base"]}
  # Table 4's own figure: one line per data-type family and adapter.
  (fig,) = table4_bits.get_table()["figures"]
  lines = figures.xy_lines(spec, fig, points)
  # One line per (family, adapter); x sorted; mean and sample std of the
  # two seeds at nf2 r=4: 0.7 +- 0.1 * sqrt(2).
  assert sorted(lines) == ["int r=4", "nf r=16", "nf r=4"]
  (x0, m0, s0), (x1, m1, s1) = lines["nf r=4"]
  assert (x0, x1) == (2.0, 3.0)
  assert m0 == pytest.approx(0.7, abs=1e-12) and m1 == 0.75
  assert s0 == pytest.approx(0.1 * 2**0.5, abs=1e-12) and s1 == 0.0
  assert lines["int r=4"] == [(2.0, 0.5, 0.0)]
  # A single key as a string still works.
  assert sorted(
    figures.xy_lines(spec, dict(fig, series="adapter"), points)
  ) == [
    "r=16",
    "r=4",
  ]
  figures.xy(spec, fig, points, tmp_path / fig["file"])
  assert (tmp_path / fig["file"]).stat().st_size > 0


def test_every_sweep_config_gives_valid_settings_at_every_point():
  """Each committed sweep config's points apply and pass the settings
  check (no training): a typo in a table's overrides fails here."""
  import pathlib  # noqa: PLC0415

  from qlora_jax.engine.settings import Settings  # noqa: PLC0415

  root = pathlib.Path(__file__).resolve().parent.parent / "configs"
  checked = 0
  for path in sorted(root.glob("table*.py")):
    module = sweep.config_module(path)
    if not hasattr(module, "get_sweep"):
      continue
    base = module.get_config()
    for entry in module.get_sweep():
      point = sweep.points_of([entry])[0]
      Settings.from_config(sweep.apply_overrides(base, point.overrides))
      checked += 1
  assert checked >= 21 * 2  # tables 2 and 7 at least


def test_zero_shot_metrics_come_from_the_step_0_eval(tmp_path):
  from qlora_jax.ablations import results  # noqa: PLC0415

  d = tmp_path / "points" / "p"
  d.mkdir(parents=True)
  (d / "metrics.jsonl").write_text(
    '{"kind": "eval", "step": 0, "loss": 5.0, "answer_accuracy": 0.0}\n'
    '{"kind": "train", "step": 1, "loss": 4.0}\n'
    '{"kind": "eval", "step": 32, "loss": 0.5, "answer_accuracy": 0.6}\n'
  )
  (d / "point.json").write_text('{"labels": {"m": 1}, "overrides": {}}')
  (d / "final_metrics.json").write_text('{"loss": 0.5}')
  (p,) = results.load_points(tmp_path)
  assert p["metrics"] == {
    "loss": 0.5,
    "zero_shot_loss": 5.0,
    "zero_shot_answer_accuracy": 0.0,
  }


def test_a_second_sweep_on_the_same_folder_is_refused(tmp_path):
  config = tiny_config.get_config(str(tmp_path / "data"))
  points = [{"method": "a", "train.seed": s} for s in (0, 1)]
  out, refused, lines = tmp_path / "sweep", [], []

  def second_sweep_runs(config, workdir):
    pytest.fail(f"a second sweep ran {workdir}")

  def runner(config, workdir):  # a second sweep starts during the first
    if not refused:
      with pytest.raises(outputs.OutputError) as e:
        sweep.run_sweep(config, points, out, runner=second_sweep_runs)
      refused.append(str(e.value))
    (workdir / results.DONE).write_text(json.dumps({"loss": 1.0}))
    return True

  got = sweep.run_sweep(config, points, out, runner=runner, echo=lines.append)
  assert list(got.values()) == ["done", "done"]
  assert "--workdir" in refused[0] and "being written by process" in refused[0]
  assert not list(out.rglob(results.ERROR))
  assert sorted(p.name for p in tmp_path.iterdir()) == ["sweep"]  # no lock
