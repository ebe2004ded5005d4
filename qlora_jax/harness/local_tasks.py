"""The data files of the local lm-eval tasks in `tasks/` (regenerate with
`python -c "from qlora_jax.harness import local_tasks;
local_tasks.write('tasks')"`).

- stdlib_docstring_questions.jsonl / _fewshot.jsonl: the main job's
  docstring question (`stdlib_docstrings.question_rows`) on its eval
  split, and few-shot examples from its train split; `answer` is the
  package's index in `PACKAGES`.
- stdlib_source.jsonl: held-out standard-library source (modules outside
  the docstring task's packages), one document per module, cut to
  `SOURCE_CHARS` at a line end.
"""

import json
import os
import pathlib

from qlora_jax.data import stdlib_docstrings as sd

EVAL_PER_CLASS = 10
FEWSHOT_PER_CLASS = 2
SOURCE_MODULES = (
  "textwrap",
  "shlex",
  "fnmatch",
  "colorsys",
  "bisect",
  "heapq",
  "keyword",
  "glob",
)
SOURCE_CHARS = 3000


def _questions(rows: list[dict], per_class: int) -> list[dict]:
  return [
    {**q, "answer": sd.PACKAGES.index(q["completion"])}
    for q in sd.question_rows(rows, per_class)
  ]


def _source(module: str, stdlib: str) -> str:
  text = pathlib.Path(stdlib, module + ".py").read_text(encoding="utf-8")
  if len(text) > SOURCE_CHARS:
    text = text[: text.rfind("\n", 0, SOURCE_CHARS) + 1]
  return text


def write(folder: str | os.PathLike, stdlib: str | None = None) -> None:
  """Writes the three JSONL files into `folder`."""
  stdlib = stdlib or sd.stdlib_dir()
  train, evaluation = sd.build_splits(stdlib)
  files = {
    "stdlib_docstring_questions.jsonl": _questions(evaluation, EVAL_PER_CLASS),
    "stdlib_docstring_fewshot.jsonl": _questions(train, FEWSHOT_PER_CLASS),
    "stdlib_source.jsonl": [
      {"module": m, "text": _source(m, stdlib)} for m in SOURCE_MODULES
    ],
  }
  for name, rows in files.items():
    with open(os.path.join(folder, name), "w", encoding="utf-8") as f:
      for row in rows:
        f.write(json.dumps(row, ensure_ascii=False) + "\n")
