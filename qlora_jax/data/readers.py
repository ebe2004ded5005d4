"""Readers for the formats users have: JSONL and plain text files.

JSONL, one JSON object per line (blank lines are skipped, extra fields are
ignored):

  language modelling   {"text": "..."}
  instruction tuning   {"prompt": "...", "completion": "..."}, or
                       {"messages": [{"role": ..., "content": ...}, ...]}
                       (multi-turn; at least one assistant message)
  classification       {"text": "...", "label": "..."}

Strings must be non-empty (not only whitespace); the prompt may be empty.
Labels are strings; integer labels are converted to strings ("3"). Plain text
files (`.txt`) are language-modelling data: one document per blank-line
separated paragraph (`text_split="paragraph"`, the default) or one per
non-blank line (`text_split="line"`).

Every error names the file and the 1-based line, e.g.
`data/train.jsonl:17: missing field "label"`. Each example keeps that location
in `where`, so later stages (an unknown label at eval) can name it too.
"""

import dataclasses
import json
import os
from collections.abc import Iterator, Sequence
from typing import Any

from qlora_jax.data import chat

EXAMPLE_KINDS = ("lm", "instruction", "classification")
TEXT_SPLITS = ("paragraph", "line")


@dataclasses.dataclass(frozen=True)
class TextExample:
  """A document for language modelling."""

  text: str
  where: str  # "path:line" of the source, for error messages


@dataclasses.dataclass(frozen=True)
class InstructionExample:
  """A prompt and its completion; the loss covers the completion only."""

  prompt: str
  completion: str
  where: str


@dataclasses.dataclass(frozen=True)
class ChatExample:
  """A conversation; the loss covers the assistant's messages only."""

  messages: tuple[dict[str, str], ...]
  where: str


@dataclasses.dataclass(frozen=True)
class ClassificationExample:
  """A text and its label (always a string)."""

  text: str
  label: str
  where: str


Example = TextExample | InstructionExample | ChatExample | ClassificationExample


def read_examples(
  path: str | os.PathLike, task: str, text_split: str = "paragraph"
) -> list[Example]:
  """Reads `path` for `task` ("lm", "instruction" or "classification").

  `.txt` files are read as plain text (language modelling only); anything
  else as JSONL.
  """
  if task not in EXAMPLE_KINDS:
    raise ValueError(f"task must be one of {EXAMPLE_KINDS}, got {task!r}")
  if str(path).endswith(".txt"):
    if task != "lm":
      raise ValueError(
        f"{path}: plain text files hold language-modelling data; task "
        f"{task!r} needs a JSONL file"
      )
    return read_text_file(path, text_split)
  readers = {
    "lm": read_lm_jsonl,
    "instruction": read_instruction_jsonl,
    "classification": read_classification_jsonl,
  }
  return readers[task](path)


def read_lm_jsonl(path: str | os.PathLike) -> list[TextExample]:
  """Reads `{"text": ...}` lines."""
  examples = [
    TextExample(_text_field(obj, "text", where), where)
    for where, obj in _jsonl_objects(path)
  ]
  return _non_empty(examples, path)


def read_instruction_jsonl(
  path: str | os.PathLike,
) -> list[InstructionExample | ChatExample]:
  """Reads `{"prompt": ..., "completion": ...}` lines (prompt may be "") and
  `{"messages": [...]}` lines."""
  examples = []
  for where, obj in _jsonl_objects(path):
    if "messages" in obj:
      examples.append(ChatExample(_messages_field(obj, where), where))
      continue
    if "prompt" not in obj and "text" in obj:
      raise ValueError(
        f'{where}: missing field "prompt": this is instruction data '
        '({"prompt", "completion"} or {"messages"} rows); a {"text"} row '
        "is plain text, which data.instruction=False trains on"
      )
    examples.append(
      InstructionExample(
        prompt=_text_field(obj, "prompt", where, allow_empty=True),
        completion=_text_field(obj, "completion", where),
        where=where,
      )
    )
  return _non_empty(examples, path)


def _checked_messages(obj: dict, where: str) -> tuple[dict[str, str], ...]:
  messages = obj["messages"]
  try:
    chat.check_messages(messages, where)
  except chat.TemplateError as e:
    raise ValueError(str(e)) from e
  return tuple({"role": m["role"], "content": m["content"]} for m in messages)


def _messages_field(obj: dict, where: str) -> tuple[dict[str, str], ...]:
  messages = _checked_messages(obj, where)
  if not any(m["role"] == "assistant" for m in messages):
    raise ValueError(f"{where}: no assistant message to learn from")
  return messages


def prompt_messages(
  obj: dict, where: str, answer: str
) -> tuple[dict[str, str], ...]:
  """The conversation a row asks the assistant to answer: its "messages"
  (not ending with an assistant turn), or its "prompt" as one user turn.
  `answer` names the row's answer fields, for the error."""
  if "messages" in obj:
    messages = _checked_messages(obj, where)
    if not messages or messages[-1]["role"] == "assistant":
      raise ValueError(
        f'{where}: "messages" must end with a turn that is not the '
        f"assistant's: {answer} the assistant's next turn"
      )
    return messages
  if "prompt" not in obj:
    raise ValueError(f'{where}: missing field "prompt" (or "messages")')
  return ({"role": "user", "content": _text_field(obj, "prompt", where)},)


def read_classification_jsonl(
  path: str | os.PathLike,
) -> list[ClassificationExample]:
  """Reads `{"text": ..., "label": ...}` lines; int labels become strings."""
  examples = [
    ClassificationExample(
      text=_text_field(obj, "text", where),
      label=_label_field(obj, where),
      where=where,
    )
    for where, obj in _jsonl_objects(path)
  ]
  return _non_empty(examples, path)


def read_records(
  path: str | os.PathLike, fields: Sequence[str]
) -> list[tuple[str, dict]]:
  """Reads JSONL objects for prediction: ("path:line", object) per line.

  Each object needs one of `fields` (the first present is used), a string;
  the first field may be empty only when it is "prompt".
  """
  records = []
  for where, obj in _jsonl_objects(path):
    name = next((f for f in fields if f in obj), None)
    if name is None:
      wanted = " or ".join(f'"{f}"' for f in fields)
      raise ValueError(f"{where}: missing field {wanted}")
    _text_field(obj, name, where, allow_empty=name == "prompt")
    records.append((where, obj))
  return _non_empty(records, path)


def read_text_file(
  path: str | os.PathLike, text_split: str = "paragraph"
) -> list[TextExample]:
  """Reads a UTF-8 text file into documents, one per paragraph or line.

  Paragraphs are runs of non-blank lines, joined with "\\n"; a line holding
  only whitespace counts as blank. `where` is the paragraph's first line.
  """
  if text_split not in TEXT_SPLITS:
    raise ValueError(
      f"text_split must be one of {TEXT_SPLITS}, got {text_split!r}"
    )
  examples = []
  block: list[str] = []
  start = 0
  for number, line in _lines(path):
    line = line.rstrip("\r\n")
    if not line.strip():
      if block:
        examples.append(TextExample("\n".join(block), f"{path}:{start}"))
        block = []
      continue
    if text_split == "line":
      examples.append(TextExample(line, f"{path}:{number}"))
      continue
    if not block:
      start = number
    block.append(line)
  if block:
    examples.append(TextExample("\n".join(block), f"{path}:{start}"))
  return _non_empty(examples, path)


def _lines(path: str | os.PathLike) -> Iterator[tuple[int, str]]:
  """Yields (1-based line number, decoded line); bad UTF-8 names the line."""
  with open(path, "rb") as f:
    for number, raw in enumerate(f, start=1):
      try:
        # utf-8-sig drops a byte-order mark at the start of the file.
        yield number, raw.decode("utf-8-sig" if number == 1 else "utf-8")
      except UnicodeDecodeError as e:
        raise ValueError(
          f"{path}:{number}: not valid UTF-8 ({e.reason})"
        ) from e


def _jsonl_objects(path: str | os.PathLike) -> Iterator[tuple[str, dict]]:
  """Yields ("path:line", object) for each non-blank line."""
  for number, line in _lines(path):
    if not line.strip():
      continue
    where = f"{path}:{number}"
    try:
      obj = json.loads(line)
    except json.JSONDecodeError as e:
      raise ValueError(
        f"{where}: invalid JSON ({e.msg} at column {e.colno})"
      ) from e
    if not isinstance(obj, dict):
      raise ValueError(
        f"{where}: expected a JSON object, got {_json_type(obj)}"
      )
    yield where, obj


def _text_field(
  obj: dict, name: str, where: str, allow_empty: bool = False
) -> str:
  if name not in obj:
    raise ValueError(f'{where}: missing field "{name}"')
  value = obj[name]
  if not isinstance(value, str):
    raise ValueError(
      f'{where}: field "{name}" must be a string, got {_json_type(value)}'
    )
  if not allow_empty and not value.strip():
    raise ValueError(f'{where}: field "{name}" is empty')
  return value


def _label_field(obj: dict, where: str) -> str:
  if "label" not in obj:
    raise ValueError(f'{where}: missing field "label"')
  value = obj["label"]
  if isinstance(value, int) and not isinstance(value, bool):
    return str(value)
  if not isinstance(value, str):
    raise ValueError(
      f'{where}: field "label" must be a string or an integer, got '
      f"{_json_type(value)}"
    )
  if not value.strip():
    raise ValueError(f'{where}: field "label" is empty')
  return value


def _json_type(value: Any) -> str:
  """The JSON name of a decoded value's type, for messages."""
  if value is None:
    return "null"
  if isinstance(value, bool):
    return "a boolean"
  if isinstance(value, (int, float)):
    return "a number"
  if isinstance(value, str):
    return "a string"
  if isinstance(value, list):
    return "an array"
  return "an object"


def _non_empty(examples: list, path: str | os.PathLike) -> list:
  if not examples:
    raise ValueError(f"{path}: no examples (the file is empty)")
  return examples
