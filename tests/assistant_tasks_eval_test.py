"""The assistant's held-out tasks in lm-eval 0.4.13 itself: each YAML of
tasks/ loads through `TaskManager(include_path="tasks")` with its item
count and output type, and the RougeL of `tasks/stdlib_summary_utils.py`
equals `rouge_score`'s (0.1.2, `RougeScorer(["rougeL"])`, the F-measure)
on every reference of `stdlib_summary_gen` against a prediction made of
half its words and part of another reference. Marked `eval`: run where
lm-eval is installed, `.venv-peers/bin/python -m pytest
tests/assistant_tasks_eval_test.py`.
"""

import importlib.util
import json
import pathlib
import random

import pytest

pytestmark = pytest.mark.eval
lm_eval_tasks = pytest.importorskip("lm_eval.tasks")

ROOT = pathlib.Path(__file__).resolve().parents[1]
TASKS = {
  "chatterbot_trivia_mc": ("multiple_choice", 246),
  "chatterbot_heldout_ppl": ("loglikelihood_rolling", 267),
  "stdlib_docstring_mc_heldout": ("multiple_choice", 855),
  "stdlib_summary_gen": ("generate_until", 937),
}


def test_the_tasks_load_in_lm_eval(monkeypatch):
  monkeypatch.chdir(ROOT)  # the YAMLs name their files from the root
  manager = lm_eval_tasks.TaskManager(include_path=str(ROOT / "tasks"))
  loaded = manager.load(list(TASKS))["tasks"]
  for name, (output_type, items) in TASKS.items():
    task = loaded[name]
    assert task.OUTPUT_TYPE == output_type
    assert len(list(task.test_docs())) == items
  trivia = loaded["chatterbot_trivia_mc"]
  doc = next(iter(trivia.test_docs()))
  assert trivia.doc_to_choice(doc)[trivia.doc_to_target(doc)] == (
    "Richard Nixon"
  )


def test_rouge_l_equals_rouge_score():
  scorer = pytest.importorskip("rouge_score.rouge_scorer")
  path = ROOT / "tasks" / "stdlib_summary_utils.py"
  spec = importlib.util.spec_from_file_location("summary_utils", path)
  utils = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(utils)
  rows = [
    json.loads(line)
    for line in (ROOT / "tasks" / "stdlib_summaries.jsonl").open()
  ]
  reference = scorer.RougeScorer(["rougeL"])
  rng = random.Random(0)
  for row in rows:
    words = row["summary"].split()
    prediction = " ".join(rng.sample(words, max(1, len(words) // 2)))
    prediction += " " + rng.choice(rows)["summary"][:30]
    want = reference.score(row["summary"], prediction)["rougeL"].fmeasure
    assert utils.rouge_l(prediction, row["summary"]) == pytest.approx(
      want, abs=1e-12
    )
