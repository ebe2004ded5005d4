"""lm-eval requests as token ids (harness.requests), against values worked
out by hand from lm-eval 0.4.13's rules; no lm-eval needed."""

import ast
import pathlib

import pytest

from qlora_jax.harness import requests


def _chars(text: str) -> list[int]:
  """A tokenizer of one id per character (its code point)."""
  return [ord(c) for c in text]


def _words(text: str) -> list[int]:
  """A tokenizer merging a space into the word after it (" b" is one id)."""
  ids, i = [], 0
  while i < len(text):
    j = i + 1 if text[i] != " " else i + 2
    ids.append(hash(text[i:j]) % 1000)
    i = j
  return ids


def test_trailing_space_moves_into_the_continuation():
  ctx, cont = requests.encode_pair(_chars, "Answer: ", "xml")
  assert ctx == _chars("Answer:")
  assert cont == _chars(" xml")


def test_pair_is_encoded_jointly_and_split_at_the_context_length():
  # "a" + " b": jointly [a, " b"]; the context alone is [a].
  ctx, cont = requests.encode_pair(_words, "a", " b")
  assert ctx == _words("a")
  assert cont == _words(" b")
  assert len(cont) == 1


def test_empty_context_takes_the_prefix_token():
  assert requests.empty_context([5, 6], prefix_id=1) == ([1], [5, 6])
  # A continuation starting with the prefix token gives it up as context.
  assert requests.empty_context([1, 6, 7], prefix_id=1) == ([1], [6, 7])


def test_scored_row_cuts_from_the_left():
  row = requests.scored_row([1, 2, 3, 4], [5, 6], max_length=4)
  # (ctx + cont)[-(4 + 1):][:-1] = [2, 3, 4, 5, 6][:-1]
  assert row.inputs == [2, 3, 4, 5]
  assert row.targets == [5, 6]
  assert requests.scored_row([1], [2], max_length=4).inputs == [1]
  with pytest.raises(ValueError, match="exceeds the maximum length"):
    requests.scored_row([1], [2, 3, 4], max_length=2)


def test_rolling_windows_as_lm_eval_documents_them():
  # lm-eval's LM.loglikelihood_rolling docstring: tokens 0..9, prefix P,
  # max length 4 -> (P 0 1 2 | 0 1 2 3), (3 4 5 6 | 4 5 6 7),
  # (5 6 7 8 | 8 9); made disjoint, a context drops what it predicts.
  p = -1
  assert requests.rolling_windows(range(10), p, 4) == [
    ([p], [0, 1, 2, 3]),
    ([3], [4, 5, 6, 7]),
    ([5, 6, 7], [8, 9]),
  ]
  # Scored rows put back the full context: the last window sees 4 tokens.
  last = requests.scored_row([5, 6, 7], [8, 9], 4)
  assert last.inputs == [5, 6, 7, 8]
  assert requests.rolling_windows([], p, 4) == []
  assert requests.rolling_windows([0, 1], p, 4) == [([p], [0, 1])]


def test_longest_first_ties_broken_by_ids():
  rows = [[3], [1, 2], [0, 9], [5, 5, 5]]
  assert requests.longest_first(rows) == [3, 2, 1, 0]


def test_buckets_are_powers_of_two_and_midpoints_up_to_the_maximum():
  lengths = (1, 32, 33, 48, 49, 64, 65, 96, 100, 193, 257, 300)
  want = [32, 32, 48, 48, 64, 64, 96, 96, 128, 256, 300, 300]
  assert [requests.bucket(n, 300) for n in lengths] == want
  # Scored positions (smallest 1): powers of two below 64.
  assert [requests.bucket(n, 300, 1) for n in (1, 2, 3, 5, 40)] == [
    1,
    2,
    4,
    8,
    48,
  ]
  with pytest.raises(ValueError, match="exceeds"):
    requests.bucket(301, 300)


def test_last_batch_is_a_power_of_two_of_rows():
  sizes = [requests.batch_rows(n, 8) for n in (20, 8, 5, 3, 1)]
  assert sizes == [8, 8, 8, 4, 1]
  assert requests.batch_rows(3, 2) == 2


def test_generation_settings_as_lm_eval_normalises_them():
  g = requests.generation({"until": "\n", "max_new_tokens": 5}, "</s>")
  assert g == requests.Generation(("\n", "</s>"), 5)
  g = requests.generation({"do_sample": False, "temperature": 0.7}, None, 9)
  assert (g.until, g.max_gen_toks, g.temperature) == ((), 9, 0.0)
  assert requests.generation({"temperature": 0.5}, None).temperature == 0.5
  with pytest.raises(ValueError, match="unsupported"):
    requests.generation({"num_beams": 2}, None)


def test_cut_at_stops():
  assert requests.cut_at_stops(" xml.\nnext", ["\n", "."]) == " xml"
  assert requests.cut_at_stops("abc", ["", "z"]) == "abc"


def test_only_the_backend_imports_lm_eval_at_module_level():
  root = pathlib.Path(__file__).resolve().parent.parent
  found = []
  for path in sorted(root.joinpath("qlora_jax").rglob("*.py")) + sorted(
    root.joinpath("experiments").rglob("*.py")
  ):
    for node in ast.parse(path.read_text()).body:  # module level only
      names = []
      if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
      elif isinstance(node, ast.ImportFrom):
        names = [node.module or ""]
      if any(n.split(".")[0] == "lm_eval" for n in names):
        found.append(path.relative_to(root).as_posix())
  assert found == ["qlora_jax/harness/backend.py"]
