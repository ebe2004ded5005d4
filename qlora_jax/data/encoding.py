"""Examples -> token ids -> arrays (see `arrays` for the fields).

Language modelling: a document is the text with the special tokens the
tokenizer's post-processor adds (e.g. <s> for Llama), then the end token
(EOS, else SEP) unless the post-processor already put it last.

Instruction tuning: the prompt and the completion are tokenized separately
(so the boundary between them is exact) and joined:
`prefix specials + prompt + completion + suffix specials + EOS`; the targets
of the loss are the completion's tokens and the EOS.
"""

import dataclasses
import logging
import os
from collections.abc import Sequence

import numpy as np

from qlora_jax.data import arrays, chat
from qlora_jax.data.labels import LabelMap
from qlora_jax.data.readers import (
  ChatExample,
  ClassificationExample,
  InstructionExample,
  TextExample,
  read_classification_jsonl,
)
from qlora_jax.data.tokenizer import Tokenizer


@dataclasses.dataclass(frozen=True)
class ClassificationData:
  """Train and eval arrays of a classification task and its label map."""

  train: dict[str, np.ndarray]
  eval: dict[str, np.ndarray]
  label_map: LabelMap
  eval_examples: list[ClassificationExample]  # row i of `eval`, for printing


def classification_splits(
  train_path: str | os.PathLike,
  eval_path: str | os.PathLike,
  tokenizer: Tokenizer,
  max_length: int,
) -> ClassificationData:
  """Reads both JSONL files; the label map comes from the training file."""
  train_examples = read_classification_jsonl(train_path)
  eval_examples = read_classification_jsonl(eval_path)
  label_map = LabelMap.from_examples(train_examples)
  return ClassificationData(
    train=encode_classification(
      train_examples, tokenizer, label_map, max_length
    ),
    eval=encode_classification(eval_examples, tokenizer, label_map, max_length),
    label_map=label_map,
    eval_examples=eval_examples,
  )


def encode_classification(
  examples: Sequence[ClassificationExample],
  tokenizer: Tokenizer,
  label_map: LabelMap,
  max_length: int,
) -> dict[str, np.ndarray]:
  """Rows of `max_length` tokens, texts truncated (special tokens kept).

  A label missing from `label_map` raises naming the example's file and line.
  """
  labels = label_map.ids(examples)
  ids = tokenizer.encode_batch(
    [e.text for e in examples], max_length=max_length
  )
  specials = tokenizer.num_special_tokens
  for e, row in zip(examples, ids, strict=True):
    if len(row) <= specials:
      raise ValueError(f"{e.where}: the text encodes to no tokens")
  return arrays.classification_arrays(ids, labels, max_length, tokenizer.pad_id)


def encode_lm(
  examples: Sequence[TextExample | InstructionExample],
  tokenizer: Tokenizer,
  max_length: int,
  packing: bool = False,
  drop_empty: bool = False,
) -> dict[str, np.ndarray]:
  """Next-token arrays, one document per row or packed into rows.

  A row whose prompt fills all `max_length` positions has no loss token:
  it is reported as a warning, or, with `drop_empty` (evaluation, where
  such a row adds nothing to the token-weighted loss), left out and
  logged at info level.
  """
  if packing and tokenizer.end_id is None:
    raise ValueError(
      "packing needs a token to separate documents, and the tokenizer has "
      "neither an EOS nor a SEP token"
    )
  documents = lm_documents(examples, tokenizer)
  if packing:
    result = arrays.packed_lm_arrays(documents, max_length, tokenizer.pad_id)
  else:
    result = arrays.padded_lm_arrays(documents, max_length, tokenizer.pad_id)
    empty = np.flatnonzero(result["loss_mask"].sum(axis=1) == 0)
    if len(empty):
      log = logging.info if drop_empty else logging.warning
      log(
        "%d of %d rows have no loss token (the prompt fills all %d "
        "positions), first at %s%s",
        len(empty),
        len(documents),
        max_length,
        examples[empty[0]].where,
        ": left out of the loss" if drop_empty else "",
      )
      if drop_empty and len(empty) < len(documents):
        keep = result["loss_mask"].sum(axis=1) > 0
        result = {k: v[keep] for k, v in result.items()}
  if not result["loss_mask"].any():
    raise ValueError(f"no row has a loss token at max_length={max_length}")
  return result


def chat_messages(e: InstructionExample | ChatExample) -> list[dict]:
  """The conversation an instruction example is, for a chat template."""
  if isinstance(e, ChatExample):
    return [dict(m) for m in e.messages]
  messages = [{"role": "user", "content": e.prompt}] if e.prompt else []
  return messages + [{"role": "assistant", "content": e.completion}]


def chat_document(
  e: InstructionExample | ChatExample, tokenizer: Tokenizer
) -> arrays.Document:
  """The conversation rendered with the tokenizer's chat template; the
  loss covers each assistant message from its first token through the
  template's end-of-turn, nothing else."""
  if tokenizer.chat_template is None:
    raise ValueError(
      f"{e.where}: a chat example needs a tokenizer with a chat template"
    )
  messages = chat_messages(e)

  def render(part, generation_prompt):
    try:
      return tokenizer.apply_chat_template(part, generation_prompt)
    except chat.TemplateError as err:
      raise ValueError(f"{e.where}: {err}") from err

  text = render(messages, False)
  spans = []
  for i, m in enumerate(messages):
    if m["role"] != "assistant":
      continue
    before = _text_before(messages, i, render, e.where)
    through = render(messages[: i + 1], False)
    if not (text.startswith(before) and text.startswith(through)):
      raise ValueError(
        f"{e.where}: the chat template does not render message {i} as a "
        "prefix of the whole conversation, so its tokens cannot be found"
      )
    spans.append((len(before), len(through)))
  ids, starts = tokenizer.encode_offsets(text)
  loss = [any(a <= c < b for a, b in spans) for c in starts]
  if not any(loss[1:]):
    raise ValueError(f"{e.where}: the assistant's messages encode to no tokens")
  return arrays.Document(ids, 1, loss)


# Stands in for the text of message 0 to find where a template puts it.
_MARK = "\x00message 0\x00"


def _text_before(messages: list[dict], i: int, render, where: str) -> str:
  """The rendered text ahead of assistant message i's own tokens: the
  messages before it with the generation prompt (what the model is given
  to write it); before message 0, what the template writes ahead of its
  text (a default system prompt, the turn's header), found by rendering a
  marker in its place."""
  if i:
    return render(messages[:i], True)
  marked = render([dict(messages[0], content=_MARK)], False)
  if _MARK not in marked:
    raise ValueError(
      f"{where}: the chat template does not render the text of message 0 "
      "as it is, so its tokens cannot be found"
    )
  return marked[: marked.index(_MARK)]


def prompt_and_answer(
  e: InstructionExample | ChatExample, tokenizer: Tokenizer
) -> tuple[list[int], str]:
  """The ids a model answers (up to the last assistant message) and that
  message's text: what generation at evaluation compares."""
  messages = chat_messages(e)
  last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
  if tokenizer.chat_template is not None:
    text = tokenizer.apply_chat_template(messages[:last], True)
    ids = tokenizer.encode_offsets(text)[0]
  else:
    prompt = "".join(m["content"] for m in messages[:last])
    ids = list(tokenizer.special_prefix) + tokenizer.encode(
      prompt, add_special_tokens=False
    )
  return ids, messages[last]["content"]


def lm_documents(
  examples: Sequence[TextExample | InstructionExample], tokenizer: Tokenizer
) -> list[arrays.Document]:
  """Token ids of each example as a Document, in order."""
  prefix = list(tokenizer.special_prefix)
  suffix = list(tokenizer.special_suffix)
  end = [] if tokenizer.end_id is None else [tokenizer.end_id]
  for e in examples:
    if not isinstance(e, (TextExample, InstructionExample, ChatExample)):
      raise TypeError(
        f"{getattr(e, 'where', '?')}: language modelling takes text, "
        f"prompt/completion or chat examples, got {type(e).__name__}"
      )
  if tokenizer.chat_template is not None or any(
    isinstance(e, ChatExample) for e in examples
  ):
    return [
      chat_document(e, tokenizer)
      if not isinstance(e, TextExample)
      else _text_document(e, tokenizer, prefix, suffix, end)
      for e in examples
    ]
  texts = [e.text if isinstance(e, TextExample) else e.prompt for e in examples]
  completions = [
    e.completion if isinstance(e, InstructionExample) else "" for e in examples
  ]
  bodies = tokenizer.encode_batch(texts, add_special_tokens=False)
  tails = tokenizer.encode_batch(completions, add_special_tokens=False)
  documents = []
  for e, body, tail in zip(examples, bodies, tails, strict=True):
    if isinstance(e, TextExample):
      if not body:
        raise ValueError(f"{e.where}: the text encodes to no tokens")
      tokens = prefix + body + suffix
      first_target = 1
    else:
      if not tail:
        raise ValueError(f"{e.where}: the completion encodes to no tokens")
      tokens = prefix + body + tail + suffix
      first_target = max(1, len(prefix) + len(body))
    if end and tokens[-1] != end[0]:
      tokens = tokens + end
    documents.append(arrays.Document(tokens, first_target))
  return documents


def _text_document(e, tokenizer, prefix, suffix, end) -> arrays.Document:
  body = tokenizer.encode(e.text, add_special_tokens=False)
  if not body:
    raise ValueError(f"{e.where}: the text encodes to no tokens")
  tokens = prefix + body + suffix
  if end and tokens[-1] != end[0]:
    tokens = tokens + end
  return arrays.Document(tokens, 1)
