"""Table 10's arithmetic task: disjoint splits, the committed files, the
reward's values, and the sweep's points."""

import json
import pathlib

import pytest

from configs import table10_rl
from qlora_jax.data import arithmetic

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _pair(row: dict) -> tuple[int, int]:
  a, b = row["messages"][-1]["content"].split("?")[0].split()[2::2]
  return tuple(sorted((int(a), int(b))))


def test_train_and_held_out_share_no_pair_and_miss_the_shots():
  train, held_out = arithmetic.splits()
  assert (len(train), len(held_out)) == (41, 58)
  train_pairs = {_pair(r) for r in train}
  held_pairs = {_pair(r) for r in held_out}
  assert not train_pairs & held_pairs  # nor a + b against b + a
  assert len(train_pairs) + len(held_pairs) == 54  # 55 pairs less 4 + 4
  assert (4, 4) not in train_pairs | held_pairs
  for r in train + held_out:
    a, b = _pair(r)
    assert r["answer"] == str(a + b)
    assert [m["role"] for m in r["messages"]] == ["user", "assistant"] * 2 + [
      "user"
    ]


def test_committed_files_are_the_writers(tmp_path):
  for path in arithmetic.write(tmp_path):
    assert path.read_bytes() == (ROOT / "tasks" / path.name).read_bytes()
  c = table10_rl.get_config()
  assert pathlib.Path(c.data.eval_path).name == arithmetic.FILES[1]
  rows = [json.loads(x) for x in pathlib.Path(c.data.eval_path).open()]
  assert rows == arithmetic.splits()[1]


@pytest.mark.parametrize(
  "completion, want",
  [
    ("12", 1.0),
    (" 12.\n", 1.0),
    ("6 + 6 = 12", 0.5),
    ("The answer is 12.", 0.5),
    ("112", 0.1),  # not 12: a number is read whole
    ("6 + 6 = 10", 0.1),
    ("13", 0.1),
    ("twelve", 0.0),
    ("", 0.0),
  ],
)
def test_reward_values(completion, want):
  row = {"answer": "12"}
  assert arithmetic.reward("What is 6 + 6?", completion, row) == want


def test_table10_points_are_seed_major_with_three_rates_per_row():
  points = table10_rl.get_sweep()
  assert len(points) == 5 * 3 * 3
  first_seed = points[:15]
  assert {p["train.seed"] for p in first_seed} == {0}
  rates = {}
  for p in first_seed:
    rates.setdefault(p["method"], []).append(p["opt.learning_rate"])
  assert len(rates) == 5 and all(len(v) == 3 for v in rates.values())
  # LoRA's grid is full fine-tuning's times 10.
  full = rates.pop("Full fine-tune")
  for lora in rates.values():
    assert lora == pytest.approx([10 * r for r in full])
