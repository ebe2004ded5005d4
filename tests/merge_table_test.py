"""Table 8's arithmetic (ablations.merging) and the 95% interval.

References: intervals computed by hand below from the Student t quantiles
of a printed table (t(0.975, 2) = 4.302653, t(0.975, 4) = 2.776445), and
row comparisons on arrays whose differences are known.
"""

import json
import math

import numpy as np
import pytest

from qlora_jax.ablations import merging, results


def test_interval_by_hand():
  # 3 seeds: mean 0.5, sample sd 0.1, half-width 4.302653 * 0.1 / sqrt(3).
  mean, half, n = results.interval([0.4, 0.5, 0.6])
  assert n == 3 and mean == pytest.approx(0.5, abs=1e-12)
  assert half == pytest.approx(4.302653 * 0.1 / math.sqrt(3), rel=1e-6)
  # 5 seeds: 1..5, mean 3, sd sqrt(2.5), half-width 2.776445 * sd / sqrt(5).
  mean, half, n = results.interval([1.0, 2.0, 3.0, 4.0, 5.0])
  assert (mean, n) == (3.0, 5)
  assert half == pytest.approx(2.776445 * math.sqrt(2.5 / 5), rel=1e-6)
  # One value: no interval; none: nothing.
  assert math.isnan(results.interval([0.7])[1])
  assert results.interval([])[2] == 0
  # Past the table, within 1e-4 of t(0.975, 40) = 2.021075.
  assert results.t_quantile(40) == pytest.approx(2.021075, abs=1e-4)
  with pytest.raises(ValueError, match="degrees of freedom"):
    results.t_quantile(0)


def _outputs(logits, tokens, loss=1.0, acc=0.5, nbytes=10):
  return merging.Outputs(
    loss, acc, ["x"] * len(tokens), np.array(tokens), np.array(logits), nbytes
  )


def test_compare_gives_the_largest_logit_gap_and_the_token_share():
  source = _outputs([[0.0, 1.0], [2.0, 3.0]], [[5, 6], [7, 8]])
  row = _outputs([[0.0, 1.5], [2.0, 2.0]], [[5, 6], [7, 9]], 0.9, 0.25, 4)
  got = merging.compare(row, source)
  assert got["max_logit_diff"] == 1.0  # |2.0 - 3.0|
  assert got["same_tokens"] == 0.75  # 3 of 4 tokens
  assert (got["eval_loss"], got["answer_accuracy"], got["base_bytes"]) == (
    0.9,
    0.25,
    4,
  )
  assert "max_logit_diff" not in merging.compare(row, None)


def test_markdown_shows_mean_interval_and_n():
  rows = [
    {
      "seed": s,
      "row": "a",
      "answer_accuracy": v,
      "eval_loss": 1.0,
      "base_bytes": 2e6,
    }
    for s, v in enumerate([0.4, 0.5, 0.6])
  ]
  rows.append(
    {
      "seed": 0,
      "row": "b",
      "answer_accuracy": 0.5,
      "eval_loss": 2.0,
      "max_logit_diff": 0.25,
      "same_tokens": 1.0,
      "base_bytes": 4e6,
    }
  )
  table = merging.markdown(rows).splitlines()
  half = 4.302653 * 0.1 / math.sqrt(3)
  line_a = next(t for t in table if t.startswith("| a |"))
  assert f"0.500 ± {half:.3f}" in line_a and line_a.endswith("| 3 |")
  assert "| 2.0 |" in line_a  # 2 MB on every seed: no interval
  line_b = next(t for t in table if t.startswith("| b |"))
  assert "| 0.25 |" in line_b and line_b.endswith("| 1 |")
  line_c = next(t for t in table if t.startswith("| c |"))
  assert line_c.endswith("| - | - | - | - | - | 0 |")


def test_diverged_seeds_are_counted_and_named(tmp_path):
  from qlora_jax.ablations import tables  # noqa: PLC0415

  def point(name, loss, step0=None, labels=None):
    d = tmp_path / name
    d.mkdir()
    if step0 is not None:
      (d / "metrics.jsonl").write_text(
        json.dumps({"kind": "eval", "step": 0, "loss": step0}) + "\n"
      )
    if labels is not None:
      (d / "labels.json").write_text(json.dumps(labels))
    keys = {"method": "m", "train.seed": len(list(tmp_path.iterdir()))}
    return {"dir": d, "keys": keys, "metrics": {"loss": loss}, "error": None}

  points = [
    point("ok", 0.5, step0=2.0),
    point("worse", 2.5, step0=2.0),  # above its zero-shot loss
    point("nan", float("nan")),
    point("uniform", 0.8, labels={"a": 0, "b": 1}),  # above ln 2
  ]
  assert results.diverged(points[0]) is None
  assert "above the untrained model's 2.0000" in results.diverged(points[1])
  assert results.diverged(points[2]) == "eval loss nan"
  # No step-0 eval: a classifier's untrained loss is ln(classes).
  assert results.untrained_loss(points[3]) == pytest.approx(math.log(2))
  assert "above the untrained model's 0.6931" in results.diverged(points[3])
  spec = {"title": "t", "rows": ["method"], "metrics": [["loss", "loss", "f4"]]}
  text = tables.markdown(spec, points)
  assert "| m |" in text and text.count("diverged, counted in its row") == 3
  assert "| 4 (3 diverged) |" in text


def test_a_seed_of_the_table_on_a_tiny_gguf(tmp_path):
  # Both runs (2 steps each, in their own processes) over a tiny all-Q4_1
  # GGUF chat model, then the six rows. Invariants: a float merge and the
  # exact QA-LoRA merge keep the logits (1e-4 of the largest) and every
  # greedy token; re-quantizing keeps NF4's bytes, the Q4_1 file the base's.
  from tests import tiny_config  # noqa: PLC0415
  from tests.models_gguf_test import hf_tensors, write_gguf  # noqa: PLC0415
  from tests.qa_lora_test import _all_q4_1  # noqa: PLC0415

  gguf = write_gguf(
    tmp_path / "tiny.gguf", hf_tensors("llama", False, 7), kind_of=_all_q4_1
  )
  words = tiny_config.FIRST + tiny_config.SECOND
  rows = [
    {
      "prompt": f"{words[i % 20]} {words[(i + 3) % 20]}",
      "completion": words[i % 7],
    }
    for i in range(16)
  ]
  for name, part in (("train", rows), ("eval", rows[:4])):
    (tmp_path / f"{name}.jsonl").write_text(
      "".join(json.dumps(r) + "\n" for r in part)
    )
  config = tiny_config.get_config(str(tmp_path))
  config.model.checkpoint = str(gguf)
  config.model.task = "causal_lm"
  config.data.instruction = True
  config.data.chat_template = "none"  # the base has none: plain text
  config.data.max_length = 16
  config.data.eval_generate = 4
  config.data.max_new_tokens = 3
  config.train.steps = 2
  config.train.eval_every = 2
  config.opt.learning_rate = 3e-2
  # The two runs trained here in-process (run_seed would spawn one process
  # per run, as sweeps do); run_seed finds them done.
  from qlora_jax.ablations import sweep  # noqa: PLC0415
  from qlora_jax.engine import train  # noqa: PLC0415

  for name, overrides in merging.RUNS.items():
    cfg = sweep.apply_overrides(config, {**overrides, "train.seed": 0})
    train.train_and_evaluate(cfg, str(tmp_path / "table" / "seed0" / name))
  said = []
  out = merging.run_seed(config, tmp_path / "table", 0, say=said.append)
  assert not any("training" in line for line in said)
  got = {r["row"]: r for r in out}
  assert sorted(got) == list("abcdef")
  for row in ("b", "e"):  # float32 sums in another order: 1e-5
    assert got[row]["max_logit_diff"] <= 1e-5 * got[row]["max_abs_logit"]
    assert got[row]["same_tokens"] == 1.0, row
  assert got["c"]["base_bytes"] == got["a"]["base_bytes"]
  assert got["f"]["base_bytes"] == got["d"]["base_bytes"]
  assert got["b"]["base_bytes"] > got["a"]["base_bytes"]  # float32 now
  # A rerun finds every row done and trains nothing.
  again = merging.run_seed(config, tmp_path / "table", 0, say=said.append)
  assert again == out and len(said) == 6  # one line per row, the first time


def test_best_table_picks_each_rows_best_value_by_the_mean(tmp_path):
  from qlora_jax.ablations import tables  # noqa: PLC0415

  # pass@1 by (method, learning rate) over 2 seeds; by hand: LoRA's best
  # rate is 1e-3 (mean 0.55 against 0.45 and 0.1), full's 1e-4 (0.35).
  grid = {
    ("LoRA", 1e-4): (0.4, 0.5),
    ("LoRA", 1e-3): (0.5, 0.6),
    ("LoRA", 1e-2): (0.0, 0.2),
    ("Full", 1e-5): (0.1, 0.1),
    ("Full", 1e-4): (0.3, 0.4),
  }
  points = []
  for (method, lr), values in grid.items():
    for seed, v in enumerate(values):
      d = tmp_path / f"{method}_{lr}_{seed}"
      d.mkdir()
      keys = {"method": method, "opt.learning_rate": lr, "train.seed": seed}
      points.append(
        {"dir": d, "keys": keys, "metrics": {"pass@1": v}, "error": None}
      )
  spec = {
    "title": "t",
    "rows": ["method", "opt.learning_rate"],
    "metrics": [["pass@1", "pass@1 (%)", "pct"]],
    "best": {
      "over": "opt.learning_rate",
      "metric": ["pass@1", "pass@1 (%)", "pct"],
      "reference": "Full",
    },
  }
  header, rows = tables.best_rows(spec, points)
  assert header == [
    "method",
    "best learning_rate",
    "pass@1 (%)",
    "n",
    "learning_rate / Full's",
  ]
  half = 12.706205 * math.sqrt(0.005) / math.sqrt(2)  # t(0.975, 1) s / √n
  assert rows[0] == ["LoRA", "0.001", f"55.0 ± {100 * half:.1f}", "2", "10"]
  assert rows[1][:2] == ["Full", "0.0001"] and rows[1][-1] == "1"
  text = tables.markdown(spec, points)
  assert "**Best opt.learning_rate of each row** (by the mean)" in text
  # A reference tied at its best (every rate 0, as a collapsed run) has
  # no one best rate: both are shown and no ratio is made up.
  tied = [
    dict(p, metrics={"pass@1": 0.0}) if p["keys"]["method"] == "Full" else p
    for p in points
  ]
  _, rows = tables.best_rows(spec, tied)
  assert rows[1] == ["Full", "1e-05 / 0.0001 (tied)", "0.0", "2", "tied"]
  assert rows[0][-1] == "tied"
