"""DPO pairs from a model's own answers (`engine.preference_pairs`): the
tiny Llama answers the docstring questions; each answer that is not the
one asked for becomes a pair, chosen = the package, rejected = the
answer."""

import dataclasses
import json

import pytest

from qlora_jax.engine import answers, preference_pairs
from qlora_jax.engine.settings import Settings
from tests import tiny_dpo_config


@pytest.fixture(scope="module")
def settings(tmp_path_factory):
  folder = tmp_path_factory.mktemp("pairs")
  tiny_dpo_config.write_run(folder, 1, 1)
  c = tiny_dpo_config.get_config(str(folder))
  c.train.objective = "sft"
  c.data.source = "stdlib_questions"
  c.data.questions_per_class = 1
  c.data.eval_questions_per_class = 1
  c.data.max_length = 32  # a docstring keeps its end (the question's)
  c.train.batch_size = 8
  return Settings.from_config(c)


def _rows(path):
  return [json.loads(line) for line in path.read_text().splitlines()]


def test_each_wrong_answer_is_a_pair(settings, tmp_path):
  counts = preference_pairs.write_pairs(settings, tmp_path, max_new_tokens=4)
  for split in ("train", "eval"):
    questions = _rows(tmp_path / "questions" / f"{split}.jsonl")
    pairs = _rows(tmp_path / f"{split}.jsonl")
    n = counts[split]
    assert n["questions"] == len(questions) == 8
    assert n["pairs"] == len(pairs) and n["pairs"] + n["right"] <= 8
    expected = {q["prompt"]: q["completion"] for q in questions}
    assert pairs, "the random tiny model answers every question right"
    for row in pairs:
      assert set(row) == {"prompt", "chosen", "rejected"}
      assert row["chosen"] == expected[row["prompt"]]
      assert row["rejected"].strip()
      assert not answers.same_answer(row["rejected"], row["chosen"])


def test_pairs_come_from_the_docstring_questions_only(settings, tmp_path):
  other = dataclasses.replace(
    settings, data=dataclasses.replace(settings.data, source="jsonl")
  )
  with pytest.raises(ValueError, match="data.source: pairs are made from"):
    preference_pairs.write_pairs(other, tmp_path, max_new_tokens=4)
