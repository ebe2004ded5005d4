"""Held-out real text for perplexity: code and English that nobody tuned on.

Two sources that any machine with pip can rebuild (the first depends on the
Python version, which `perplexity` records with the points):
- `stdlib_source`: the full source (code, comments, docstrings) of
  `STDLIB_MODULES`, single-file standard-library modules outside the
  main job's docstring task (`data.stdlib_docstrings.PACKAGES`), read in
  that order from the running interpreter's library;
- `chatterbot_english`: the English conversations of the `chatterbot-corpus`
  wheel (BSD-3-Clause; ~2.3k question/answer turns in YAML), fetched with
  `pip download --no-deps` and cached like the model checkpoints.

Each source is one string; `perplexity.token_windows` cuts it into windows.
"""

import os
import pathlib
import sysconfig
import zipfile

import yaml

from qlora_jax.data.stdlib_docstrings import PACKAGES
from qlora_jax.models.minilm import cache_dir, download_wheel

STDLIB_MODULES = (
  "argparse",
  "textwrap",
  "shutil",
  "fractions",
  "heapq",
  "statistics",
  "difflib",
  "calendar",
  "csv",
  "pprint",
  "dataclasses",
  "functools",
)
CHATTERBOT = "chatterbot-corpus==1.3.3"
CHATTERBOT_GLOB = "chatterbot_corpus-1.3.3-*.whl"
CHATTERBOT_ENGLISH = "chatterbot_corpus/data/english/"

assert not set(STDLIB_MODULES) & set(PACKAGES)  # disjoint from the task


def stdlib_source(stdlib: str | os.PathLike | None = None) -> str:
  """The sources of `STDLIB_MODULES`, one after another (blank-line joined).

  Raises:
    FileNotFoundError: a module is missing from `stdlib`.
  """
  root = pathlib.Path(stdlib or sysconfig.get_paths()["stdlib"])
  parts = []
  for name in STDLIB_MODULES:
    path = root / f"{name}.py"
    if not path.is_file():
      raise FileNotFoundError(f"stdlib_source: {path} not found")
    parts.append(path.read_text(encoding="utf-8"))
  return "\n\n".join(parts)


def conversations_text(document: str, where: str) -> str:
  """One chatterbot YAML file as text: each conversation's turns on lines of
  their own, conversations separated by blank lines (an entry that is a
  string, not a list, is one turn).

  Raises:
    ValueError: `where` is not a chatterbot file (no `conversations` list
      of lists of strings), naming the file and the entry.
  """
  try:
    doc = yaml.safe_load(document)
  except yaml.YAMLError as e:
    raise ValueError(f"{where}: not YAML: {e}") from e
  convs = doc.get("conversations") if isinstance(doc, dict) else None
  if not isinstance(convs, list):
    raise ValueError(f"{where}: no 'conversations' list")
  out = []
  for i, turns in enumerate(convs):
    if isinstance(turns, str):  # a one-line entry (trivia.yml has one)
      turns = [turns]
    if not isinstance(turns, list) or not all(
      isinstance(t, (str, int, float)) for t in turns
    ):
      raise ValueError(f"{where}: conversations[{i}] is not a list of text")
    out.append("\n".join(str(t).strip() for t in turns))
  return "\n\n".join(out)


def chatterbot_english(cache: str | os.PathLike | None = None) -> str:
  """Every English conversation of the chatterbot corpus, files in name
  order (downloading the wheel once into the cache)."""
  wheel = download_wheel(
    cache_dir(cache) / "wheels", CHATTERBOT, CHATTERBOT_GLOB
  )
  parts = []
  with zipfile.ZipFile(wheel) as z:
    names = sorted(
      n
      for n in z.namelist()
      if n.startswith(CHATTERBOT_ENGLISH) and n.endswith(".yml")
    )
    if not names:
      raise RuntimeError(f"{wheel} holds no {CHATTERBOT_ENGLISH}*.yml")
    for n in names:
      text = z.read(n).decode("utf-8")
      parts.append(conversations_text(text, f"{wheel}:{n}"))
  return "\n\n".join(parts)


SOURCES = {
  "stdlib_source": stdlib_source,
  "chatterbot_english": chatterbot_english,
}


def read_source(name: str) -> tuple[str, str]:
  """(label, text) of a named source or a UTF-8 text file's path."""
  if name in SOURCES:
    return name, SOURCES[name]()
  path = pathlib.Path(name)
  if not path.is_file():
    raise ValueError(
      f"text source {name!r} is neither a file nor one of {sorted(SOURCES)}"
    )
  return path.stem, path.read_text(encoding="utf-8")
