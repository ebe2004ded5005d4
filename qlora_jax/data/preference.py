"""Preference pairs (DPO): a prompt, a chosen and a rejected answer.

JSONL rows `{"prompt": "...", "chosen": "...", "rejected": "..."}` (a
user turn) or `{"messages": [...], "chosen": ..., "rejected": ...}` (the
conversation so far, ending with a turn that is not the assistant's).
Each answer is rendered as the assistant's next turn with the tokenizer's
chat template (plain `prompt + answer + EOS` without one), exactly as
instruction tuning renders a conversation (`encoding.chat_document`); its
tokens, through the template's end of turn, are the ones scored.

Arrays: every `arrays.LM_FIELDS` field with a pair axis, [N, 2, L]:
index 0 the chosen answer, 1 the rejected one.

Errors name the file and line: a row without "chosen" or "rejected", a
pair whose answers are the same (as strings, or as the tokens kept within
`max_length`), and a prompt that leaves no token of an answer within
`max_length`.
"""

import dataclasses
import logging
import os
from collections.abc import Sequence

import numpy as np

from qlora_jax.data import arrays, readers
from qlora_jax.data.encoding import lm_documents
from qlora_jax.data.readers import (
  ChatExample,
  InstructionExample,
  _jsonl_objects,
  _non_empty,
  _text_field,
)
from qlora_jax.data.tokenizer import Tokenizer

CHOSEN, REJECTED = 0, 1


@dataclasses.dataclass(frozen=True)
class PreferenceExample:
  """A conversation ending before the assistant's turn, and two answers."""

  messages: tuple[dict[str, str], ...]
  chosen: str
  rejected: str
  where: str

  def answered(self, answer: str) -> ChatExample:
    """The conversation with `answer` as the assistant's turn."""
    turn = {"role": "assistant", "content": answer}
    return ChatExample(self.messages + (turn,), self.where)


def read_preference_jsonl(path: str | os.PathLike) -> list[PreferenceExample]:
  """Reads `{"prompt" | "messages", "chosen", "rejected"}` lines."""
  examples = []
  for where, obj in _jsonl_objects(path):
    for field in ("chosen", "rejected"):
      if field not in obj:
        raise ValueError(
          f'{where}: missing field "{field}": a preference row holds '
          '{"prompt" or "messages", "chosen", "rejected"}'
        )
    chosen = _text_field(obj, "chosen", where)
    rejected = _text_field(obj, "rejected", where)
    if chosen == rejected:
      raise ValueError(
        f'{where}: "chosen" and "rejected" are the same text: a pair '
        "with nothing to prefer"
      )
    examples.append(
      PreferenceExample(
        readers.prompt_messages(
          obj, where, 'the pair\'s "chosen" and "rejected" are'
        ),
        chosen,
        rejected,
        where,
      )
    )
  return _non_empty(examples, path)


def encode_preference(
  examples: Sequence[PreferenceExample], tokenizer: Tokenizer, max_length: int
) -> dict[str, np.ndarray]:
  """[N, 2, max_length] arrays of every LM field (chosen, rejected).

  An answer cut at `max_length` keeps its first tokens (logged); a prompt
  that leaves no token of an answer, or a pair cut to the same tokens, is
  an error naming the row.
  """
  sides = []
  for side in ("chosen", "rejected"):
    conversations = [e.answered(getattr(e, side)) for e in examples]
    if tokenizer.chat_template is None:
      conversations = [_plain(c) for c in conversations]
    documents = lm_documents(conversations, tokenizer)
    rows = arrays.padded_lm_arrays(documents, max_length, tokenizer.pad_id)
    cut = sum(len(d.tokens) > max_length + 1 for d in documents)
    if cut:
      logging.info(
        "%d of %d %s answers are cut to data.max_length=%d tokens",
        cut,
        len(documents),
        side,
        max_length,
      )
    for i in np.flatnonzero(rows["loss_mask"].sum(axis=1) == 0):
      prompt = len(documents[i].tokens) - int(
        np.sum(arrays.target_tokens(documents[i]))
      )
      raise ValueError(
        f"{examples[i].where}: the prompt takes {prompt} tokens, leaving "
        f"no token of the {side} answer within data.max_length="
        f"{max_length}: shorten the prompt or raise data.max_length"
      )
    sides.append(rows)
  out = {k: np.stack([sides[0][k], sides[1][k]], axis=1) for k in sides[0]}
  same = np.all(out["targets"][:, 0] == out["targets"][:, 1], axis=1) & np.all(
    out["loss_mask"][:, 0] == out["loss_mask"][:, 1], axis=1
  )
  if same.any():
    i = int(np.flatnonzero(same)[0])
    raise ValueError(
      f"{examples[i].where}: the chosen and rejected answers are the same "
      f"within data.max_length={max_length} tokens: a pair with nothing "
      "to prefer"
    )
  return out


def _plain(e: ChatExample) -> InstructionExample:
  """A one-turn pair without a chat template: prompt + answer."""
  if len(e.messages) != 2:
    raise ValueError(
      f"{e.where}: a conversation of several turns needs a tokenizer with "
      "a chat template"
    )
  return InstructionExample(
    e.messages[0]["content"], e.messages[1]["content"], e.where
  )
