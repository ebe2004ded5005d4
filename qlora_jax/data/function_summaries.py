"""Standard-library functions and their one-line summaries.

Each example asks for the summary line of a function's docstring from its
signature and body ("write the one-line summary of this function"), the
task the QLoRA paper scores on Super-NaturalInstructions with RougeL.
Functions (methods included) are read with `ast` from every module of the
running interpreter's standard library outside `SKIPPED_DIRS` and
`EXCLUDED`: the docstring question's packages and the modules whose
source is held out for perplexity (`harness.local_tasks.SOURCE_MODULES`,
`ablations.corpora.STDLIB_MODULES`). Kept: a docstring whose first line
is a sentence of `MIN_SUMMARY`..`MAX_SUMMARY` characters ending in a
period and standing alone (a blank line or nothing after it); a body
with a statement besides the docstring; code (the function without its
docstring, dedented) of at most `MAX_CODE` characters. A summary or code
seen twice is kept once (the first, in module order), so no text is on
both sides of the split.

Split by module, never by function: a function goes to the held-out side
when a SHA-256 of its top-level module or package name falls in the first
`HELD_OUT_FRACTION` of the hash range. The result depends only on the
installed standard library.
"""

import ast
import dataclasses
import functools
import os
import textwrap
import warnings

from qlora_jax.data.chatterbot import hash_fraction
from qlora_jax.data.stdlib_docstrings import PACKAGES, stdlib_dir

HELD_OUT_FRACTION = 0.3
MIN_SUMMARY = 20
MAX_SUMMARY = 120
MAX_CODE = 1200
SKIPPED_DIRS = frozenset(
  {
    "test",
    "tests",
    "idle_test",
    "__pycache__",
    "site-packages",
    "lib-dynload",
    "idlelib",
    "turtledemo",
    "ensurepip",
    "pydoc_data",
  }
)
# The docstring question's packages and the perplexity tasks' modules.
EXCLUDED = frozenset(PACKAGES) | {
  "argparse",
  "bisect",
  "calendar",
  "colorsys",
  "csv",
  "dataclasses",
  "difflib",
  "fnmatch",
  "fractions",
  "functools",
  "glob",
  "heapq",
  "keyword",
  "pprint",
  "shlex",
  "shutil",
  "statistics",
  "textwrap",
}
INSTRUCTION = (
  "Write the one-line summary of this Python function's docstring from "
  "its signature and body.\n\n"
)


@dataclasses.dataclass(frozen=True)
class Function:
  """One function: where it is, its code without the docstring, and the
  first line of its docstring."""

  module: str  # dotted, e.g. "json.decoder"
  name: str  # qualified within the module, e.g. "JSONDecoder.decode"
  code: str
  summary: str

  @property
  def source_id(self) -> str:
    """What the split keeps together: the top-level module or package."""
    return self.module.split(".")[0]

  @property
  def prompt(self) -> str:
    return INSTRUCTION + self.code


def summary_line(doc: str) -> str | None:
  """The docstring's first line if it is a one-line summary, else None."""
  lines = doc.strip().splitlines()
  first = lines[0].strip()
  if len(lines) > 1 and lines[1].strip():
    return None  # the sentence goes on
  if not MIN_SUMMARY <= len(first) <= MAX_SUMMARY or not first.endswith("."):
    return None
  if ">>>" in first or not first[0].isupper():
    return None
  return first


def _functions_in(source: str, module: str) -> list[Function]:
  with warnings.catch_warnings():  # e.g. invalid escapes in old sources
    warnings.simplefilter("ignore", SyntaxWarning)
    tree = ast.parse(source)
  lines = source.splitlines()
  out = []

  def visit(node, prefix):
    for child in ast.iter_child_nodes(node):
      if isinstance(child, ast.ClassDef):
        visit(child, f"{prefix}{child.name}.")
      elif isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
        f = _function(child, lines, module, prefix)
        if f is not None:
          out.append(f)

  visit(tree, "")
  return out


def _function(node, lines, module, prefix) -> Function | None:
  doc = ast.get_docstring(node)
  if not doc or len(node.body) < 2:
    return None
  summary = summary_line(doc)
  if summary is None:
    return None
  first = (node.decorator_list[0] if node.decorator_list else node).lineno
  body = node.body[0]
  kept = (
    lines[first - 1 : body.lineno - 1]
    + lines[body.end_lineno : node.end_lineno]
  )
  code = textwrap.dedent("\n".join(kept)).strip("\n")
  if len(code) > MAX_CODE:
    return None
  return Function(module, prefix + node.name, code, summary)


def module_files(stdlib: str) -> list[tuple[str, str]]:
  """(dotted module name, path) of each .py file outside `SKIPPED_DIRS`
  and `EXCLUDED`, sorted by name."""
  out = []
  for folder, subfolders, names in os.walk(stdlib):
    subfolders[:] = sorted(
      d
      for d in subfolders
      if d not in SKIPPED_DIRS and not d.startswith("config-")
    )
    rel = os.path.relpath(folder, stdlib)
    parts = [] if rel == "." else rel.split(os.sep)
    for n in sorted(names):
      if not n.endswith(".py"):
        continue
      dotted = parts + ([] if n == "__init__.py" else [n[:-3]])
      if not dotted or dotted[0] in EXCLUDED:
        continue
      out.append((".".join(dotted), os.path.join(folder, n)))
  return sorted(out)


def functions(stdlib: str | None = None) -> tuple[Function, ...]:
  """Every kept function, in module then source order, each once."""
  return _functions(stdlib or stdlib_dir())


@functools.lru_cache(maxsize=2)  # a pure function of the library's files
def _functions(stdlib: str) -> tuple[Function, ...]:
  seen_code, seen_summary, out = set(), set(), []
  for module, path in module_files(stdlib):
    with open(path, "rb") as f:
      try:
        source = f.read().decode("utf-8")
        found = _functions_in(source, module)
      except (UnicodeDecodeError, SyntaxError):
        continue  # lib2to3's test data and the like
    for fn in found:
      if fn.code in seen_code or fn.summary in seen_summary:
        continue
      seen_code.add(fn.code)
      seen_summary.add(fn.summary)
      out.append(fn)
  return tuple(out)


def split(
  fns: tuple[Function, ...],
) -> tuple[list[Function], list[Function]]:
  """(train, held out), by module (see the module docstring)."""
  held = [f for f in fns if hash_fraction(f.source_id) < HELD_OUT_FRACTION]
  train = [f for f in fns if hash_fraction(f.source_id) >= HELD_OUT_FRACTION]
  return train, held
