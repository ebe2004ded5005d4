"""The assistant's data: every source split by its source, never by row.

No held-out source (an opening question, a top-level module, a docstring)
is among the training rows `data.source` "assistant" writes, and the
held-out tasks in tasks/ hold only held-out items.
"""

import json
import pathlib

import pytest

from qlora_jax.ablations import corpora
from qlora_jax.data import assistant, chatterbot, function_summaries
from qlora_jax.data import stdlib_docstrings as sd
from qlora_jax.harness import assistant_tasks, local_tasks

TASKS = pathlib.Path("tasks")


@pytest.fixture(scope="module")
def functions():
  return function_summaries.split(function_summaries.functions())


def _jsonl(name: str) -> list[dict]:
  return [json.loads(line) for line in (TASKS / name).open(encoding="utf-8")]


def test_the_vendored_corpus_is_the_wheels_2026_conversations():
  rows = chatterbot.read()
  assert len(rows) == 2026
  topics = {}
  for r in rows:
    topics[r["topic"]] = topics.get(r["topic"], 0) + 1
  assert len(topics) == 21
  assert (topics["tech support"], topics["trivia"], topics["coding"]) == (
    1050,
    261,
    184,
  )
  bingo = [r for r in rows if "two little ducks" in r["messages"][0]["content"]]
  assert [m["content"] for m in bingo[0]["messages"]][1] == "22"
  assert (chatterbot.VENDORED.parent / "chatterbot-corpus-LICENSE.md").is_file()


def test_a_conversation_entry_that_is_not_a_list_is_named():
  with pytest.raises(ValueError, match=r"f\.yml: conversations\[1\] is not"):
    chatterbot.conversations("conversations:\n- [a, b]\n- {x: 1}\n", "f.yml")


def test_no_held_out_conversation_shares_its_opening_with_training():
  split = assistant.chat_split()
  train = {chatterbot.source_id(r) for r in split.train}
  held = split.held_out + split.trivia + split.trivia_fewshot
  assert not train & {chatterbot.source_id(r) for r in held}
  assert len(split.train) + len(held) == 2026
  assert all(r["topic"] == "trivia" for r in split.trivia)
  # The shipped tasks are these held-out rows.
  assert [r["id"] for r in _jsonl("chatterbot_heldout.jsonl")] == [
    r["id"] for r in split.held_out
  ]
  trivia = _jsonl("chatterbot_trivia.jsonl")
  assert [r["id"] for r in trivia] == [r["id"] for r in split.trivia]
  for item in trivia:  # 4 distinct choices, the answer among them
    assert len({assistant_tasks._same(c) for c in item["choices"]}) == 4
  assert trivia == assistant_tasks.trivia_items(
    split.trivia, split.trivia + split.trivia_fewshot
  )


def test_no_held_out_module_gives_a_training_function(functions):
  train, held = functions
  assert {f.source_id for f in train}.isdisjoint({f.source_id for f in held})
  assert {f.summary for f in train}.isdisjoint({f.summary for f in held})
  assert {f.code for f in train}.isdisjoint({f.code for f in held})
  # Nor a module of the docstring question or of the perplexity tasks.
  excluded = (
    set(sd.PACKAGES)
    | set(local_tasks.SOURCE_MODULES)
    | set(corpora.STDLIB_MODULES)
  )
  assert excluded <= function_summaries.EXCLUDED
  modules = {f.source_id for f in train + held}
  assert not modules & excluded
  shipped = _jsonl("stdlib_summaries.jsonl")
  assert {r["module"].split(".")[0] for r in shipped} <= {
    f.source_id for f in held
  }
  fewshot = _jsonl("stdlib_summaries_fewshot.jsonl")
  assert {r["module"].split(".")[0] for r in fewshot} <= {
    f.source_id for f in train
  }


def test_the_training_rows_hold_nothing_held_out(tmp_path, functions):
  train_path, eval_path = assistant.write_assistant(tmp_path)
  rows = [json.loads(line) for line in open(train_path, encoding="utf-8")]
  texts = {m["content"] for r in rows for m in r["messages"]}
  split = assistant.chat_split()
  held = split.held_out + split.trivia + split.trivia_fewshot
  openings = {chatterbot.source_id(r) for r in rows}
  assert not openings & {chatterbot.source_id(r) for r in held}
  _, held_fns = functions
  assert not {f.prompt for f in held_fns} & texts
  # Docstring questions: the held-out task's texts never train.
  shipped = _jsonl("stdlib_docstring_heldout.jsonl")
  assert len(shipped) == len(sd.held_out_rows())
  assert not {q["prompt"] for q in shipped} & texts
  assert sum(1 for _ in open(eval_path, encoding="utf-8")) == (
    len(split.held_out)
    + assistant.EVAL_SUMMARIES
    + assistant.EVAL_QUESTIONS_PER_CLASS * len(sd.PACKAGES)
  )
