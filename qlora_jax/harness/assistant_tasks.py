"""The data files of the assistant's held-out lm-eval tasks in `tasks/`
(regenerate with `python -c "from qlora_jax.harness import
assistant_tasks; assistant_tasks.write('tasks')"`), made from the held-out
sides of `data.assistant`'s sources, so no item shares its source with a
row `data.source` "assistant" trains on:

- chatterbot_trivia.jsonl / _fewshot.jsonl: each trivia question with
  `CHOICES` answers, its own and distractors that are other trivia
  questions' answers of the same kind (`answer_kind`), placed by a hash;
- chatterbot_heldout.jsonl: the held-out conversations as text, a
  "User: " or "Assistant: " line per turn (perplexity);
- stdlib_docstring_heldout.jsonl: the docstring question on every
  paragraph of the docstring task's eval split;
- stdlib_summaries.jsonl / _fewshot.jsonl: held-out functions (their
  prompt and summary line), few-shot examples from training modules.
"""

import hashlib
import json
import os
import re

from qlora_jax.data import assistant, function_summaries
from qlora_jax.data import stdlib_docstrings as sd

CHOICES = 4
SUMMARY_FEWSHOT = 5
KINDS = ("year", "number", "person", "place", "thing")
_NUMBER_WORDS = (
  "zero one two three four five six seven eight nine ten eleven twelve "
  "thirteen fourteen fifteen sixteen seventeen eighteen nineteen twenty"
).split()
_DIGITS = {w: i for i, w in enumerate(_NUMBER_WORDS)}
# "Who ...", or "which / what [two words] <someone>".
_PERSON = re.compile(
  r"^\s*who\b|\b(which|what)\s+(\S+\s+){0,2}(president|prime minister|"
  r"actor|actress|singer|artist|painter|designer|leader|astronomer|"
  r"scientist|inventor|author|writer|poet|composer|character|rapper|"
  r"player|star)\b",
  re.IGNORECASE,
)
_PLACE = re.compile(
  r"\b(where|country|countries|city|state|continent|capital|sea|ocean|"
  r"island|river|mountain)\b",
  re.IGNORECASE,
)


def answer_kind(question: str, answer: str) -> str:
  """What sort of answer a trivia question has: a year, another number, a
  person, a place, or a thing."""
  words = answer.lower().replace(",", "").split()
  if re.fullmatch(r"1\d{3}|20\d{2}", answer.strip()):
    return "year"
  if words and all(w.isdigit() or w in _NUMBER_WORDS for w in words):
    return "number"
  if _PERSON.search(question):
    return "person"
  if _PLACE.search(question):
    return "place"
  return "thing"


def _same(answer: str) -> str:
  """What two answers that say the same thing share ("7" and "Seven")."""
  words = answer.lower().strip(" .").split()
  return " ".join(str(_DIGITS.get(w, w)) for w in words)


def _hash(text: str) -> str:
  return hashlib.sha256(text.encode("utf-8")).hexdigest()


def trivia_items(questions: list[dict], pool: list[dict]) -> list[dict]:
  """Each question of `questions` (chatterbot rows) as a multiple-choice
  item whose distractors are answers of `pool` rows of the same kind."""
  by_kind: dict[str, list[str]] = {k: [] for k in KINDS}
  for row in pool:
    q, a = (m["content"] for m in row["messages"][:2])
    if _same(a) not in {_same(x) for x in by_kind[answer_kind(q, a)]}:
      by_kind[answer_kind(q, a)].append(a)
  items = []
  for row in questions:
    q, a = (m["content"] for m in row["messages"][:2])
    kind = answer_kind(q, a)
    others = [x for x in by_kind[kind] if _same(x) != _same(a)]
    if len(others) < CHOICES - 1:
      raise ValueError(
        f"trivia {row['id']}: {len(others)} other answers of kind {kind!r}, "
        f"need {CHOICES - 1}"
      )
    distractors = sorted(others, key=lambda x: _hash(q + "\x00" + x))
    choices = distractors[: CHOICES - 1]
    answer = int(_hash(q), 16) % CHOICES
    choices.insert(answer, a)
    items.append(
      {
        "id": row["id"],
        "question": q,
        "choices": choices,
        "answer": answer,
        "kind": kind,
      }
    )
  return items


def conversation_text(row: dict) -> str:
  names = {"user": "User", "assistant": "Assistant"}
  return "".join(
    f"{names[m['role']]}: {m['content']}\n" for m in row["messages"]
  )


def _summary(f: function_summaries.Function) -> dict:
  return {
    "module": f.module,
    "name": f.name,
    "prompt": f.prompt,
    "summary": f.summary,
  }


def files(stdlib: str | None = None) -> dict[str, list[dict]]:
  """The rows of each data file, by file name."""
  chats = assistant.chat_split()
  trivia = chats.trivia + chats.trivia_fewshot
  fn_train, fn_held = function_summaries.split(
    function_summaries.functions(stdlib)
  )
  fewshot = sorted(fn_train, key=lambda f: _hash(f.module + "." + f.name))
  evaluation = sd.held_out_rows(stdlib)
  every = len(evaluation)
  return {
    "chatterbot_trivia.jsonl": trivia_items(chats.trivia, trivia),
    "chatterbot_trivia_fewshot.jsonl": trivia_items(
      chats.trivia_fewshot, trivia
    ),
    "chatterbot_heldout.jsonl": [
      {"id": r["id"], "topic": r["topic"], "text": conversation_text(r)}
      for r in chats.held_out
    ],
    "stdlib_docstring_heldout.jsonl": [
      {**q, "answer": sd.PACKAGES.index(q["completion"])}
      for q in sd.question_rows(evaluation, every)
    ],
    "stdlib_summaries.jsonl": [_summary(f) for f in fn_held],
    "stdlib_summaries_fewshot.jsonl": [
      _summary(f) for f in fewshot[:SUMMARY_FEWSHOT]
    ],
  }


def write(folder: str | os.PathLike, stdlib: str | None = None) -> None:
  """Writes the data files into `folder`."""
  for name, rows in files(stdlib).items():
    with open(os.path.join(folder, name), "w", encoding="utf-8") as f:
      for row in rows:
        f.write(json.dumps(row, ensure_ascii=False) + "\n")
