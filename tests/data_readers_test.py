"""Readers of JSONL and text files, and the label map."""

import json
import re

import numpy as np
import pytest

from qlora_jax.data import labels, readers


def _write(path, lines):
  path.write_text("\n".join(lines) + "\n", encoding="utf-8")
  return path


def test_lm_jsonl_keeps_order_and_one_based_lines_counting_blanks(tmp_path):
  path = _write(tmp_path / "lm.jsonl", ['{"text": "a b"}', "", '{"text": "c"}'])
  examples = readers.read_lm_jsonl(path)
  assert examples == [
    readers.TextExample("a b", f"{path}:1"),
    readers.TextExample("c", f"{path}:3"),
  ]


def test_instruction_jsonl_allows_an_empty_prompt(tmp_path):
  path = _write(
    tmp_path / "sft.jsonl",
    [
      '{"prompt": "Q?", "completion": "A.", "id": 7}',
      '{"prompt": "", "completion": "free"}',
    ],
  )
  examples = readers.read_instruction_jsonl(path)
  assert examples == [
    readers.InstructionExample("Q?", "A.", f"{path}:1"),
    readers.InstructionExample("", "free", f"{path}:2"),
  ]


def test_classification_jsonl_converts_int_labels_to_strings(tmp_path):
  path = _write(
    tmp_path / "cls.jsonl",
    ['{"text": "x", "label": 3}', '{"text": "y", "label": "pos"}'],
  )
  examples = readers.read_classification_jsonl(path)
  assert [(e.text, e.label) for e in examples] == [("x", "3"), ("y", "pos")]


BAD_LINES = [
  ("lm", '{"text": "ok"', "invalid JSON"),
  ("lm", '["text"]', "expected a JSON object, got an array"),
  ("lm", '{"txt": "a"}', 'missing field "text"'),
  ("lm", '{"text": 5}', 'field "text" must be a string, got a number'),
  ("lm", '{"text": "  \\n "}', 'field "text" is empty'),
  ("instruction", '{"prompt": "p"}', 'missing field "completion"'),
  ("instruction", '{"completion": "c"}', 'missing field "prompt"'),
  ("instruction", '{"prompt": null, "completion": "c"}', "got null"),
  ("instruction", '{"prompt": "p", "completion": ""}', '"completion" is empty'),
  ("classification", '{"text": "a"}', 'missing field "label"'),
  ("classification", '{"text": "a", "label": true}', "got a boolean"),
  ("classification", '{"text": "a", "label": 1.5}', "got a number"),
  ("classification", '{"text": "a", "label": ""}', 'field "label" is empty'),
  ("classification", '{"label": "x"}', 'missing field "text"'),
]


@pytest.mark.parametrize("task, line, message", BAD_LINES)
def test_malformed_line_names_file_line_and_field(
  tmp_path, task, line, message
):
  good = {
    "lm": '{"text": "fine"}',
    "instruction": '{"prompt": "p", "completion": "c"}',
    "classification": '{"text": "fine", "label": "a"}',
  }[task]
  path = _write(tmp_path / "train.jsonl", [good, "", line, good])
  with pytest.raises(ValueError) as error:
    readers.read_examples(path, task)
  assert str(error.value).startswith(f"{path}:3: ")
  assert message in str(error.value)


def test_invalid_utf8_names_the_line(tmp_path):
  path = tmp_path / "bad.jsonl"
  path.write_bytes(b'{"text": "ok"}\n{"text": "\xff"}\n')
  with pytest.raises(
    ValueError, match=rf"^{re.escape(str(path))}:2: not valid UTF-8"
  ):
    readers.read_lm_jsonl(path)


def test_byte_order_mark_is_ignored(tmp_path):
  path = tmp_path / "bom.jsonl"
  path.write_bytes(b'\xef\xbb\xbf{"text": "ok"}\n')
  assert readers.read_lm_jsonl(path)[0].text == "ok"


def test_file_without_examples_is_an_error(tmp_path):
  path = _write(tmp_path / "empty.jsonl", ["", "  "])
  with pytest.raises(
    ValueError, match=rf"^{re.escape(str(path))}: no examples"
  ):
    readers.read_lm_jsonl(path)


def test_text_file_by_paragraph_and_by_line(tmp_path):
  path = _write(
    tmp_path / "doc.txt", ["one a", "one b", "", "  ", "two", "", "three"]
  )
  paragraphs = readers.read_examples(path, "lm")
  assert paragraphs == [
    readers.TextExample("one a\none b", f"{path}:1"),
    readers.TextExample("two", f"{path}:5"),
    readers.TextExample("three", f"{path}:7"),
  ]
  lines = readers.read_examples(path, "lm", text_split="line")
  assert [(e.text, e.where) for e in lines] == [
    ("one a", f"{path}:1"),
    ("one b", f"{path}:2"),
    ("two", f"{path}:5"),
    ("three", f"{path}:7"),
  ]


def test_text_file_is_only_for_language_modelling(tmp_path):
  path = _write(tmp_path / "doc.txt", ["text"])
  with pytest.raises(ValueError, match="needs a JSONL file"):
    readers.read_examples(path, "classification")
  with pytest.raises(ValueError, match="task must be one of"):
    readers.read_examples(path, "translation")
  with pytest.raises(ValueError, match="text_split must be one of"):
    readers.read_text_file(path, "sentence")


def test_label_map_is_sorted_and_round_trips_through_json(tmp_path):
  examples = [
    readers.ClassificationExample("t", label, f"f:{i}")
    for i, label in enumerate(["b", "a", "c", "a", "10", "2"])
  ]
  label_map = labels.LabelMap.from_examples(examples)
  assert label_map.names == ("10", "2", "a", "b", "c")  # string order
  np.testing.assert_array_equal(label_map.ids(examples), [3, 2, 4, 2, 0, 1])
  assert label_map.ids(examples).dtype == np.int32
  path = tmp_path / "labels.json"
  label_map.save(path)
  assert json.loads(path.read_text()) == {
    "10": 0,
    "2": 1,
    "a": 2,
    "b": 3,
    "c": 4,
  }
  assert labels.LabelMap.load(path) == label_map
  assert label_map.name(4) == "c"


def test_unknown_label_at_eval_names_file_and_line(tmp_path):
  train = _write(
    tmp_path / "train.jsonl",
    ['{"text": "x", "label": "a"}', '{"text": "y", "label": "b"}'],
  )
  evaluation = _write(
    tmp_path / "eval.jsonl",
    ['{"text": "x", "label": "a"}', "", '{"text": "z", "label": "c"}'],
  )
  label_map = labels.LabelMap.from_examples(
    readers.read_classification_jsonl(train)
  )
  with pytest.raises(ValueError) as error:
    label_map.ids(readers.read_classification_jsonl(evaluation))
  assert str(error.value) == (
    f'{evaluation}:3: unknown label "c" (the training labels are "a", "b")'
  )


@pytest.mark.parametrize(
  "mapping, message",
  [
    ({"a": 1, "b": 0}, "sorted label order"),
    ({"a": 0, "b": 2}, "sorted label order"),
    ({"a": "0"}, "non-integer id"),
    ({}, "non-empty"),
  ],
)
def test_label_map_file_with_bad_ids_is_an_error(tmp_path, mapping, message):
  path = tmp_path / "labels.json"
  path.write_text(json.dumps(mapping))
  with pytest.raises(ValueError, match=message) as error:
    labels.LabelMap.load(path)
  assert str(error.value).startswith(f"{path}: ")
