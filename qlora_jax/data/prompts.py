"""Prompts to be answered by sampling (GRPO), with the rows they came from.

JSONL rows `{"prompt": "...", ...}` (a user turn) or `{"messages": [...],
...}` (the conversation so far, ending with a turn that is not the
assistant's); any other fields (a target answer, test cases) stay with
the row for the reward to read. A prompt is rendered up to the
assistant's turn with the tokenizer's chat template and its generation
prompt (the special prefix and the prompt's text without one), exactly as
accuracy by generation renders eval prompts.

Arrays: `prompt_ids` and `prompt_mask` [N, width], left-padded to the
longest prompt so that every batch has one shape, and `index` [N], each
row's place in the file. A prompt longer than the room the context
leaves is an error naming the file and line (it is not cut: the
completion would answer another question).
"""

import dataclasses
import os
from collections.abc import Sequence

import numpy as np

from qlora_jax.data import chat, readers
from qlora_jax.data.readers import _jsonl_objects, _non_empty
from qlora_jax.data.tokenizer import Tokenizer


@dataclasses.dataclass(frozen=True)
class PromptExample:
  """A conversation ending before the assistant's turn, and its row."""

  messages: tuple[dict[str, str], ...]
  row: dict
  where: str

  @property
  def prompt(self) -> str:
    """The text of the last message (what a reward sees as the prompt)."""
    return self.messages[-1]["content"]


def read_prompt_jsonl(path: str | os.PathLike) -> list[PromptExample]:
  """Reads `{"prompt" | "messages", ...}` lines."""
  examples = []
  for where, obj in _jsonl_objects(path):
    examples.append(
      PromptExample(
        readers.prompt_messages(obj, where, "the completion is"), obj, where
      )
    )
  return _non_empty(examples, path)


def prompt_ids(e: PromptExample, tokenizer: Tokenizer) -> list[int]:
  """The ids the model answers: the conversation and the assistant's
  generation prompt."""
  if tokenizer.chat_template is not None:
    try:
      text = tokenizer.apply_chat_template(list(e.messages), True)
    except chat.TemplateError as err:
      raise ValueError(f"{e.where}: {err}") from err
    return tokenizer.encode_offsets(text)[0]
  if len(e.messages) != 1:
    raise ValueError(
      f"{e.where}: a conversation of several turns needs a tokenizer with "
      "a chat template"
    )
  return list(tokenizer.special_prefix) + tokenizer.encode(
    e.prompt, add_special_tokens=False
  )


def encode_prompts(
  examples: Sequence[PromptExample],
  tokenizer: Tokenizer,
  limit: int,
  room: str,
) -> dict[str, np.ndarray]:
  """Left-padded `prompt_ids` / `prompt_mask` [N, width] and `index` [N],
  width the longest prompt's tokens.

  Raises:
    ValueError: naming the file:line of a prompt longer than `limit`,
      with `room` (what sets the limit) in the message.
  """
  rows = []
  for e in examples:
    row = prompt_ids(e, tokenizer)
    if len(row) > limit:
      raise ValueError(
        f"{e.where}: the prompt takes {len(row)} tokens, more than the "
        f"{limit} {room}: shorten the prompt or raise data.max_length"
      )
    rows.append(row)
  width = max(len(r) for r in rows)
  ids = np.full((len(examples), width), tokenizer.pad_id, np.int32)
  mask = np.zeros((len(examples), width), np.int32)
  for i, row in enumerate(rows):
    ids[i, width - len(row) :] = row
    mask[i, width - len(row) :] = 1
  return {
    "prompt_ids": ids,
    "prompt_mask": mask,
    "index": np.arange(len(examples), dtype=np.int32),
  }
