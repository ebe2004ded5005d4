"""Instruction data for turning a base model into an assistant
(`data.source` "assistant"), and the held-out sides of its sources.

Three real sources, each split by its source, never by row, so that no
held-out item shares its source with a training one:
- the chatterbot corpus's English conversations (`chatterbot`), by their
  opening question: trivia (261 questions with short answers) is held out
  whole for the trivia task (a few go to its few-shot pool); of the
  other topics a `CHAT_HELD_OUT` fraction of opening questions is held
  out (perplexity of held-out conversations);
- standard-library functions and their summary lines
  (`function_summaries`), by top-level module;
- the docstring question (`stdlib_docstrings`), by docstring.

`write_assistant` writes train.jsonl / eval.jsonl of {"messages": [...]}
rows: every training item of the three sources, and a fixed part of each
held-out side as the run's eval loss rows.
"""

import dataclasses
import json
import os

from qlora_jax.data import chatterbot, function_summaries, stdlib_docstrings

CHAT_HELD_OUT = 0.25  # of the opening questions outside trivia
TRIVIA = "trivia"
TRIVIA_FEWSHOT = 0.04  # of trivia questions: the few-shot pool
QUESTIONS_PER_CLASS = 170  # docstring questions per package (training)
# The run's eval rows: every held-out conversation, and the first of the
# held-out summaries and questions.
EVAL_SUMMARIES = 128
EVAL_QUESTIONS_PER_CLASS = 16


@dataclasses.dataclass(frozen=True)
class ChatSplit:
  """The chatterbot rows by side: training, held-out conversations, the
  trivia questions asked as the trivia task, and its few-shot pool."""

  train: list[dict]
  held_out: list[dict]
  trivia: list[dict]
  trivia_fewshot: list[dict]


def chat_split(rows: list[dict] | None = None) -> ChatSplit:
  """The split of the vendored conversations (or `rows`), in file order."""
  rows = chatterbot.read() if rows is None else rows
  sides = {k: [] for k in ("train", "held_out", "trivia", "trivia_fewshot")}
  for row in rows:
    h = chatterbot.hash_fraction(chatterbot.source_id(row))
    if row["topic"] == TRIVIA:
      sides["trivia_fewshot" if h < TRIVIA_FEWSHOT else "trivia"].append(row)
    else:
      sides["held_out" if h < CHAT_HELD_OUT else "train"].append(row)
  # Trivia shares no opening question with a conversation that trains.
  train_ids = {chatterbot.source_id(r) for r in sides["train"]}
  for side in ("trivia", "trivia_fewshot"):
    sides[side] = [
      r for r in sides[side] if chatterbot.source_id(r) not in train_ids
    ]
  return ChatSplit(**sides)


def _turns(prompt: str, answer: str) -> dict:
  return {
    "messages": [
      {"role": "user", "content": prompt},
      {"role": "assistant", "content": answer},
    ]
  }


def summary_rows(fns: list[function_summaries.Function]) -> list[dict]:
  return [_turns(f.prompt, f.summary) for f in fns]


def question_rows(rows: list[dict], per_class: int) -> list[dict]:
  return [
    _turns(q["prompt"], q["completion"])
    for q in stdlib_docstrings.question_rows(rows, per_class)
  ]


def splits(stdlib: str | None = None) -> tuple[list[dict], list[dict]]:
  """(train, eval) chat rows of the three sources."""
  chats = chat_split()
  fn_train, fn_held = function_summaries.split(
    function_summaries.functions(stdlib)
  )
  q_train, q_held = stdlib_docstrings.build_splits(stdlib)
  train = (
    [{"messages": r["messages"]} for r in chats.train]
    + summary_rows(fn_train)
    + question_rows(q_train, QUESTIONS_PER_CLASS)
  )
  evaluation = (
    [{"messages": r["messages"]} for r in chats.held_out]
    + summary_rows(fn_held[:EVAL_SUMMARIES])
    + question_rows(q_held, EVAL_QUESTIONS_PER_CLASS)
  )
  return train, evaluation


def write_assistant(
  folder: str | os.PathLike, stdlib: str | None = None
) -> tuple[str, str]:
  """Writes train.jsonl and eval.jsonl into `folder`; returns the paths."""
  os.makedirs(folder, exist_ok=True)
  paths = []
  names = ("train.jsonl", "eval.jsonl")
  for name, rows in zip(names, splits(stdlib), strict=True):
    path = os.path.join(folder, name)
    with open(path, "w", encoding="utf-8") as f:
      for row in rows:
        f.write(json.dumps(row, ensure_ascii=False) + "\n")
    paths.append(path)
  return paths[0], paths[1]
