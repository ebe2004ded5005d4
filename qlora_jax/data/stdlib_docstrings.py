"""The default task: standard-library docstrings labelled by their package.

Real text that every CPython install carries. The sources of `PACKAGES` are
parsed with `ast` (never imported; test folders skipped); the docstrings of
modules, classes and functions are cut into paragraphs, and each paragraph is
one example labelled by the top-level package it comes from. Cleaning:
paragraphs with doctest code (`>>>`) are dropped; whitespace is collapsed; the
package names themselves are removed as words (they would give the label
away); texts are cut to `MAX_CHARS` at a word boundary (about 60-100 BERT
word pieces) and those under `MIN_CHARS` dropped; a text found under two
labels is dropped, duplicates under one label kept once.

Split: a whole docstring goes to eval when a SHA-256 of its text falls in the
first `EVAL_FRACTION` of the hash range, so paragraphs of one docstring never
straddle the split. Balance: in each split every class keeps the same number
of paragraphs (those with the smallest text hashes), at most
`TRAIN_PER_CLASS` / `EVAL_PER_CLASS`. Rows are in hash order. The result
depends only on the installed standard library.
"""

import ast
import dataclasses
import hashlib
import json
import os
import re
import sysconfig
import warnings

PACKAGES = (
  "asyncio",
  "email",
  "http",
  "importlib",
  "logging",
  "typing",
  "unittest",
  "xml",
)
EVAL_FRACTION = 0.3
TRAIN_PER_CLASS = 170
EVAL_PER_CLASS = 45
MIN_CHARS = 40
MAX_CHARS = 320
_SKIPPED_DIRS = frozenset({"test", "tests", "idle_test", "__pycache__"})
_DOCUMENTED = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
# The package names as words (and a dot after them): they give the label away.
_GIVEAWAYS = re.compile(
  r"\b(?:" + "|".join(map(re.escape, PACKAGES)) + r")\b\.?", re.IGNORECASE
)


@dataclasses.dataclass(frozen=True)
class _Paragraph:
  label: str
  text: str
  group: float  # position of the whole docstring's hash in [0, 1)


QUESTION = (
  "Which Python standard-library package is this docstring from? Answer "
  "with one word: " + ", ".join(PACKAGES) + ".\n\nDocstring: "
)
QUESTION_CHARS = 200  # docstrings in questions are cut to this (words kept)


def question_rows(rows: list[dict], per_class: int) -> list[dict]:
  """The first `per_class` rows of each label as instruction rows: the
  docstring (cut to `QUESTION_CHARS` at a word boundary) asked as
  `QUESTION`, the package name as the completion."""
  counts = dict.fromkeys(PACKAGES, 0)
  out = []
  for row in rows:
    if counts[row["label"]] < per_class:
      counts[row["label"]] += 1
      text = row["text"]
      if len(text) > QUESTION_CHARS:
        cut = text.rfind(" ", 0, QUESTION_CHARS + 1)
        text = text[: cut if cut > 0 else QUESTION_CHARS]
      out.append({"prompt": QUESTION + text, "completion": row["label"]})
  return out


def write_stdlib_questions(
  folder: str | os.PathLike,
  train_per_class: int,
  eval_per_class: int,
  stdlib: str | None = None,
) -> tuple[str, str]:
  """The docstring task as instruction tuning: `train.jsonl` and
  `eval.jsonl` of {"prompt", "completion"} rows in `folder` (the same
  split as `write_stdlib_docstrings`, fewer rows per class)."""
  train, evaluation = build_splits(stdlib)
  os.makedirs(folder, exist_ok=True)
  paths = []
  for name, rows, n in (
    ("train.jsonl", train, train_per_class),
    ("eval.jsonl", evaluation, eval_per_class),
  ):
    path = os.path.join(folder, name)
    with open(path, "w", encoding="utf-8") as f:
      for row in question_rows(rows, n):
        f.write(json.dumps(row, ensure_ascii=False) + "\n")
    paths.append(path)
  return paths[0], paths[1]


def stdlib_dir() -> str:
  """The folder of the running interpreter's standard library sources."""
  return sysconfig.get_paths()["stdlib"]


def write_stdlib_docstrings(
  folder: str | os.PathLike, stdlib: str | None = None
) -> tuple[str, str]:
  """Writes `train.jsonl` and `eval.jsonl` into `folder`; returns the paths."""
  train, evaluation = build_splits(stdlib)
  os.makedirs(folder, exist_ok=True)
  paths = []
  for name, rows in (("train.jsonl", train), ("eval.jsonl", evaluation)):
    path = os.path.join(folder, name)
    with open(path, "w", encoding="utf-8") as f:
      for row in rows:
        f.write(json.dumps(row, ensure_ascii=False) + "\n")
    paths.append(path)
  return paths[0], paths[1]


def build_splits(
  stdlib: str | None = None,
) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
  """Train and eval rows `{"text": ..., "label": ...}`, balanced by class."""
  stdlib = stdlib or stdlib_dir()
  paragraphs = _unique(
    p for package in PACKAGES for p in _package_paragraphs(stdlib, package)
  )
  splits = []
  for split, cap in (("train", TRAIN_PER_CLASS), ("eval", EVAL_PER_CLASS)):
    by_label = {label: [] for label in PACKAGES}
    for p in paragraphs:
      if (p.group < EVAL_FRACTION) == (split == "eval"):
        by_label[p.label].append(p.text)
    per_class = min(cap, *(len(texts) for texts in by_label.values()))
    if per_class == 0:
      raise ValueError(
        f"{stdlib}: no {split} docstrings for some of {PACKAGES}: "
        + str({label: len(texts) for label, texts in by_label.items()})
      )
    rows = [
      {"text": text, "label": label}
      for label, texts in by_label.items()
      for text in sorted(texts, key=_hash_hex)[:per_class]
    ]
    splits.append(sorted(rows, key=lambda row: _hash_hex(row["text"])))
  return splits[0], splits[1]


def held_out_rows(stdlib: str | None = None) -> list[dict[str, str]]:
  """Every eval-split paragraph (not balanced by class) as a row
  `{"text", "label"}`, in text-hash order."""
  stdlib = stdlib or stdlib_dir()
  paragraphs = _unique(
    p for package in PACKAGES for p in _package_paragraphs(stdlib, package)
  )
  rows = [
    {"text": p.text, "label": p.label}
    for p in paragraphs
    if p.group < EVAL_FRACTION
  ]
  return sorted(rows, key=lambda row: _hash_hex(row["text"]))


def package_files(stdlib: str, package: str) -> list[str]:
  """Sorted .py files of a package (outside test folders) or the module."""
  path = os.path.join(stdlib, package)
  if os.path.isfile(path + ".py"):
    return [path + ".py"]
  if not os.path.isdir(path):
    raise FileNotFoundError(f"{path}: no such standard-library package")
  files = []
  for folder, subfolders, names in os.walk(path):
    subfolders[:] = sorted(d for d in subfolders if d not in _SKIPPED_DIRS)
    files += [
      os.path.join(folder, n) for n in sorted(names) if n.endswith(".py")
    ]
  return files


def file_docstrings(path: str) -> list[str]:
  """Docstrings of the module, its classes and functions (`ast.walk` order)."""
  with open(path, "rb") as f:  # bytes: ast honours the coding declaration
    source = f.read()
  with warnings.catch_warnings():  # e.g. invalid escapes in old sources
    warnings.simplefilter("ignore", SyntaxWarning)
    tree = ast.parse(source, filename=path)
  docs = (
    ast.get_docstring(n) for n in ast.walk(tree) if isinstance(n, _DOCUMENTED)
  )
  return [d for d in docs if d]


def clean_paragraph(paragraph: str) -> str | None:
  """The example text of one docstring paragraph, or None to drop it."""
  if ">>>" in paragraph:
    return None
  text = " ".join(_GIVEAWAYS.sub(" ", paragraph).split())
  if len(text) > MAX_CHARS:
    cut = text.rfind(" ", 0, MAX_CHARS + 1)
    text = text[: cut if cut > 0 else MAX_CHARS]
  return text if len(text) >= MIN_CHARS else None


def _package_paragraphs(stdlib: str, package: str) -> list[_Paragraph]:
  out = []
  for path in package_files(stdlib, package):
    for doc in file_docstrings(path):
      group = _hash_fraction(" ".join(doc.split()))
      for paragraph in re.split(r"\n\s*\n", doc):
        text = clean_paragraph(paragraph)
        if text is not None:
          out.append(_Paragraph(package, text, group))
  return out


def _unique(paragraphs) -> list[_Paragraph]:
  """One paragraph per text (smallest group); texts with two labels dropped."""
  kept: dict[str, _Paragraph] = {}
  conflicting = set()
  for p in paragraphs:
    other = kept.get(p.text)
    if other is not None and other.label != p.label:
      conflicting.add(p.text)
    if other is None or p.group < other.group:
      kept[p.text] = p
  return [p for text, p in kept.items() if text not in conflicting]


def _hash_hex(text: str) -> str:
  return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _hash_fraction(text: str) -> float:
  digest = hashlib.sha256(text.encode("utf-8")).digest()
  return int.from_bytes(digest[:8], "big") / 2.0**64
