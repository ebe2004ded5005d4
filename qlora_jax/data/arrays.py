"""Token ids -> fixed-shape numpy arrays, one dict per dataset.

Every dataset has, per row of length L (all int32):

  input_ids    [N, L]  token ids; `pad_id` on padding.
  segment_ids  [N, L]  which document a token belongs to within its row:
                       1, 2, 3, ... in order; 0 on padding.
  positions    [N, L]  position of the token in its document (0, 1, ...);
                       restarts at 0 at each document; 0 on padding.

What the model is expected to do with them: embed `input_ids` with position
`positions` (absolute embeddings or RoPE); let query i attend to key j only
where `segment_ids[i] == segment_ids[j] != 0` (and j <= i in a causal model),
so attention never crosses documents nor touches padding. A padding query has
no key to attend to: mask with a large negative number rather than -inf, or
let it attend to itself, so that no NaN appears (its outputs are never used).

`segment_ids` are not BERT's token type ids: a single-text BERT input takes
token type 0 everywhere.

Classification adds `labels` [N] (label ids). Each row holds one text; pool
as the model does ([CLS] at position 0, or the last real token at index
`sum(segment_ids > 0) - 1`, or a mean over `segment_ids > 0`).

Language modelling and instruction tuning add next-token targets:

  targets    [N, L] int32    the token that follows position t (token t+1 of
                             its document); `pad_id` where loss_mask is 0.
  loss_mask  [N, L] float32  1 where the target is a real token of the same
                             document (for instruction tuning: a token of
                             the completion, its EOS included), else 0.

The loss is sum(loss_mask * cross_entropy(logits, targets)) / sum(loss_mask).
In packing mode a document cut at the end of a row goes on in the next row as
a new segment (positions from 0 again); the target of a row's last position
may then be the first token of the next row.
"""

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

CLASSIFICATION_FIELDS = ("input_ids", "segment_ids", "positions", "labels")
LM_FIELDS = ("input_ids", "segment_ids", "positions", "targets", "loss_mask")


class Document(NamedTuple):
  """A document's ids, ending with its EOS; tokens[j] for j >= first_target
  are loss targets (1 for language modelling: every token but the first;
  len(prompt ids) for instruction tuning: the completion only)."""

  tokens: Sequence[int]
  first_target: int = 1
  # When given, tokens[j] is a loss target exactly where loss_tokens[j]
  # (a chat: the assistant's messages), and first_target is ignored.
  loss_tokens: Sequence[bool] | None = None


def target_tokens(doc: Document) -> np.ndarray:
  """bool [len(tokens)]: which tokens are loss targets."""
  if doc.loss_tokens is not None:
    return np.asarray(doc.loss_tokens, bool)
  return np.arange(len(doc.tokens)) >= doc.first_target


def classification_arrays(
  token_ids: Sequence[Sequence[int]],
  labels: Sequence[int],
  length: int,
  pad_id: int,
) -> dict[str, np.ndarray]:
  """One text per row, padded to `length` (already truncated to it)."""
  _check_length(length)
  if len(token_ids) != len(labels):
    raise ValueError(f"{len(token_ids)} texts but {len(labels)} labels")
  rows = [np.asarray(ids, np.int64) for ids in token_ids]
  for i, ids in enumerate(rows):
    if not 0 < len(ids) <= length:
      raise ValueError(
        f"text {i} has {len(ids)} tokens; expected 1 to {length} "
        "(truncate while encoding)"
      )
  arrays = _padded_rows(rows, length, pad_id)
  arrays["labels"] = np.asarray(labels, np.int32).reshape(len(rows))
  return arrays


def padded_lm_arrays(
  documents: Sequence[Document], length: int, pad_id: int
) -> dict[str, np.ndarray]:
  """One document per row; longer ones are cut to `length` input tokens.

  A cut document keeps its token `length` as the target of the last position.
  """
  _check_length(length)
  _check_documents(documents)
  kept = [np.asarray(d.tokens, np.int64)[: length + 1] for d in documents]
  arrays = _padded_rows([k[:length] for k in kept], length, pad_id)
  targets = np.full((len(kept), length), pad_id, np.int32)
  loss_mask = np.zeros((len(kept), length), np.float32)
  for i, (tokens, doc) in enumerate(zip(kept, documents, strict=True)):
    t = np.arange(len(tokens) - 1)  # positions that have a next token
    t = t[target_tokens(doc)[t + 1]]
    targets[i, t] = tokens[t + 1]
    loss_mask[i, t] = 1.0
  arrays["targets"] = targets
  arrays["loss_mask"] = loss_mask
  return arrays


def packed_lm_arrays(
  documents: Sequence[Document], length: int, pad_id: int
) -> dict[str, np.ndarray]:
  """Documents concatenated (each ends with its EOS) and cut into rows.

  Only the last row has padding. Segment ids number the pieces of documents
  within each row from 1; positions restart at 0 at each piece.
  """
  _check_length(length)
  _check_documents(documents)
  sizes = np.asarray([len(d.tokens) for d in documents])
  stream = np.concatenate([np.asarray(d.tokens, np.int64) for d in documents])
  doc_of = np.repeat(np.arange(len(documents)), sizes)
  is_target = np.concatenate([target_tokens(d) for d in documents])
  total = len(stream)
  num_rows = -(-total // length)
  size = num_rows * length

  # Next-token targets over the whole stream, then cut like the inputs.
  has_target = np.zeros(size, bool)
  has_target[: total - 1] = (doc_of[1:] == doc_of[:-1]) & is_target[1:]
  targets = np.full(size, pad_id, np.int64)
  targets[: total - 1] = np.where(has_target[: total - 1], stream[1:], pad_id)

  doc_grid = np.full(size, -1, np.int64)
  doc_grid[:total] = doc_of
  doc_grid = doc_grid.reshape(num_rows, length)
  real = doc_grid >= 0
  starts = np.ones((num_rows, length), bool)
  starts[:, 1:] = doc_grid[:, 1:] != doc_grid[:, :-1]
  columns = np.arange(length)
  start_column = np.maximum.accumulate(np.where(starts, columns, 0), axis=1)

  input_ids = np.full(size, pad_id, np.int64)
  input_ids[:total] = stream
  return {
    "input_ids": input_ids.reshape(num_rows, length).astype(np.int32),
    "segment_ids": (np.cumsum(starts & real, axis=1) * real).astype(np.int32),
    "positions": ((columns - start_column) * real).astype(np.int32),
    "targets": targets.reshape(num_rows, length).astype(np.int32),
    "loss_mask": has_target.reshape(num_rows, length).astype(np.float32),
  }


def _padded_rows(
  rows: Sequence[np.ndarray], length: int, pad_id: int
) -> dict[str, np.ndarray]:
  input_ids = np.full((len(rows), length), pad_id, np.int32)
  segment_ids = np.zeros((len(rows), length), np.int32)
  positions = np.zeros((len(rows), length), np.int32)
  for i, ids in enumerate(rows):
    input_ids[i, : len(ids)] = ids
    segment_ids[i, : len(ids)] = 1
    positions[i, : len(ids)] = np.arange(len(ids))
  return {
    "input_ids": input_ids,
    "segment_ids": segment_ids,
    "positions": positions,
  }


def _check_length(length: int) -> None:
  if isinstance(length, bool) or not isinstance(length, int) or length < 1:
    raise ValueError(f"length must be a positive integer, got {length!r}")


def _check_documents(documents: Sequence[Document]) -> None:
  if not documents:
    raise ValueError("no documents")
  for i, doc in enumerate(documents):
    if len(doc.tokens) == 0:
      raise ValueError(f"document {i} has no tokens")
    if doc.loss_tokens is not None and len(doc.loss_tokens) != len(doc.tokens):
      raise ValueError(
        f"document {i}: {len(doc.loss_tokens)} loss flags for "
        f"{len(doc.tokens)} tokens"
      )
