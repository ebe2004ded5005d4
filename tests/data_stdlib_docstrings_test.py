"""The default task: standard-library docstrings labelled by package."""

import collections
import re

import pytest

from qlora_jax.data import readers
from qlora_jax.data import stdlib_docstrings as sd


@pytest.fixture(scope="module")
def written(tmp_path_factory):
  folder = tmp_path_factory.mktemp("stdlib")
  return sd.write_stdlib_docstrings(folder)


def test_two_builds_write_identical_files(written, tmp_path):
  again = sd.write_stdlib_docstrings(tmp_path)
  for first, second in zip(written, again, strict=True):
    with open(first, "rb") as a, open(second, "rb") as b:
      assert a.read() == b.read()


def test_classes_are_the_documented_packages_and_balanced(written):
  train, evaluation = (readers.read_classification_jsonl(p) for p in written)
  for examples, cap in (
    (train, sd.TRAIN_PER_CLASS),
    (evaluation, sd.EVAL_PER_CLASS),
  ):
    counts = collections.Counter(e.label for e in examples)
    assert sorted(counts) == sorted(sd.PACKAGES)
    assert len(set(counts.values())) == 1, counts
    # On CPython 3.11 every class reaches the cap; other versions carry
    # somewhat different docstrings, hence the margin.
    assert 0.75 * cap <= next(iter(counts.values())) <= cap


def test_texts_are_clean_unique_and_in_one_split_only(written):
  train, evaluation = (readers.read_classification_jsonl(p) for p in written)
  texts = [e.text for e in train + evaluation]
  assert len(set(texts)) == len(texts)
  giveaway = re.compile(r"\b(" + "|".join(sd.PACKAGES) + r")\b", re.IGNORECASE)
  for text in texts:
    assert sd.MIN_CHARS <= len(text) <= sd.MAX_CHARS
    assert text == " ".join(text.split())
    assert ">>>" not in text and not giveaway.search(text), text


def test_clean_paragraph():
  raw = "Send a  JSON\n  email.message to the server over HTTP, then wait."
  assert sd.clean_paragraph(raw) == (
    "Send a JSON message to the server over , then wait."
  )
  text = (
    "Parse the logging configuration file and build every handler it names."
  )
  assert sd.clean_paragraph(text) == (
    "Parse the configuration file and build every handler it names."
  )
  assert sd.clean_paragraph(">>> import json\n>>> json.dumps([])") is None
  assert sd.clean_paragraph("Too short to keep, surely.") is None
  long = " ".join(["word"] * 100)  # 499 characters
  cut = sd.clean_paragraph(long)
  assert cut == " ".join(["word"] * 64) and len(cut) == 319


def test_package_files_skip_test_folders(tmp_path):
  (tmp_path / "pkg" / "sub").mkdir(parents=True)
  (tmp_path / "pkg" / "tests").mkdir()
  for name in ("pkg/b.py", "pkg/a.py", "pkg/sub/c.py", "pkg/tests/t.py"):
    (tmp_path / name).write_text('"""Doc."""\n')
  (tmp_path / "mod.py").write_text("")
  assert sd.package_files(str(tmp_path), "pkg") == [
    str(tmp_path / "pkg" / "a.py"),
    str(tmp_path / "pkg" / "b.py"),
    str(tmp_path / "pkg" / "sub" / "c.py"),
  ]
  assert sd.package_files(str(tmp_path), "mod") == [str(tmp_path / "mod.py")]
  with pytest.raises(FileNotFoundError, match="no_such"):
    sd.package_files(str(tmp_path), "no_such")


def test_file_docstrings_of_module_classes_and_functions(tmp_path):
  path = tmp_path / "m.py"
  path.write_bytes(
    b"# -*- coding: latin-1 -*-\n"
    b'"""Module \xe9."""\n'
    b'class C:\n  """Class."""\n'
    b'  async def f(self):\n    """Method."""\n'
    b"def g():\n  pass\n"
  )
  assert sd.file_docstrings(str(path)) == [
    "Module \u00e9.",
    "Class.",
    "Method.",
  ]


def test_duplicates_are_kept_once_and_texts_with_two_labels_dropped():
  P = sd._Paragraph
  kept = sd._unique(
    [
      P("email", "same text", 0.7),
      P("http", "shared text", 0.1),
      P("email", "same text", 0.2),
      P("xml", "shared text", 0.3),
      P("xml", "own text", 0.9),
    ]
  )
  assert kept == [P("email", "same text", 0.2), P("xml", "own text", 0.9)]


def test_balancing_keeps_the_smallest_class_size_per_split(
  tmp_path, monkeypatch
):
  docs = {
    name: [
      f"The {name} helper number {i} does its own distinct job."
      for i in range(n)
    ]
    for name, n in (("alpha", 40), ("beta", 15))
  }
  for name, texts in docs.items():
    body = "".join(f'def f{i}():\n  """{t}"""\n' for i, t in enumerate(texts))
    (tmp_path / f"{name}.py").write_text(body)
  monkeypatch.setattr(sd, "PACKAGES", ("alpha", "beta"))
  monkeypatch.setattr(sd, "TRAIN_PER_CLASS", 1000)
  monkeypatch.setattr(sd, "EVAL_PER_CLASS", 1000)
  train, evaluation = sd.build_splits(str(tmp_path))
  # The documented rule: a docstring is eval when its hash is under the
  # fraction; each split keeps the smaller class's count in every class.
  for rows, is_eval in ((train, False), (evaluation, True)):
    pools = {
      name: [
        t for t in texts if (sd._hash_fraction(t) < sd.EVAL_FRACTION) == is_eval
      ]
      for name, texts in docs.items()
    }
    size = min(len(p) for p in pools.values())
    assert 0 < size < len(pools["alpha"])
    counts = collections.Counter(row["label"] for row in rows)
    assert counts == {"alpha": size, "beta": size}
    for row in rows:
      assert row["text"] in pools[row["label"]]
