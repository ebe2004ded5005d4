"""Accuracy by generation: a causal LM answers eval prompts, greedily.

Each eval example (prompt / completion, or a conversation) is rendered up
to its last assistant turn with the checkpoint's chat template and the
generation prompt (`data.prompt_and_answer`); the model generates up to
`max_new_tokens` with the KV cache, stopping at the end-of-turn token, and
an answer is right when it equals the completion (up to case, surrounding
whitespace and a final full stop). Prompts are left-padded to one width
and cut into batches of one size, so a run compiles the generation once.
"""

import dataclasses
import logging
from collections.abc import Sequence

import numpy as np

from qlora_jax import data, models
from qlora_jax import nn as qnn
from qlora_jax.engine import prompt_fit


@dataclasses.dataclass
class Prompts:
  """Left-padded prompt ids [N, W] with their mask and expected answers."""

  ids: np.ndarray
  mask: np.ndarray
  answers: list[str]
  texts: list[str]


def make_prompts(
  examples: Sequence, tokenizer: data.Tokenizer, max_length: int
) -> Prompts:
  """The prompts of `examples`; one longer than `max_length` keeps its
  last `max_length` tokens (the end of the question and the turn), logged
  at info level (`prompt_fit.fit`): the run's own configured cut, as its
  training and eval rows have, so a default run does not warn."""
  rows, answers, texts = [], [], []
  for e in examples:
    ids, answer = data.prompt_and_answer(e, tokenizer)
    rows.append(ids)
    answers.append(answer)
    texts.append(tokenizer.decode(ids, skip_special_tokens=True))
  rows = prompt_fit.fit(
    rows, max_length, "eval prompt", "data.max_length", logging.info
  )
  width = max(len(r) for r in rows)
  ids = np.full((len(rows), width), tokenizer.pad_id, np.int32)
  mask = np.zeros((len(rows), width), np.int32)
  for i, r in enumerate(rows):
    ids[i, width - len(r) :] = r
    mask[i, width - len(r) :] = 1
  return Prompts(ids, mask, answers, texts)


def end_ids(tokenizer: data.Tokenizer, config) -> list[int]:
  """Tokens that end an answer: the tokenizer's end token and its chat
  template's end of turn, else the model's EOS ids."""
  if tokenizer.stop_ids:
    return list(tokenizer.stop_ids)
  return list(getattr(config, "eos_token_ids", ()))


def generate_ids(
  model,
  variables,
  prompts: Prompts,
  tokenizer: data.Tokenizer,
  batch_size: int,
  max_new_tokens: int,
) -> np.ndarray:
  """Each prompt's greedy new tokens [prompts, max_new_tokens] (padding
  after an end token)."""
  ends = end_ids(tokenizer, model.config)
  n = len(prompts.ids)
  size = min(batch_size, n)
  out = []
  for start in range(0, n, size):
    stop = min(n, start + size)
    ids = _pad_rows(prompts.ids[start:stop], size)
    mask = _pad_rows(prompts.mask[start:stop], size)
    new = models.generate(
      model,
      variables,
      ids,
      mask,
      max_new_tokens=max_new_tokens,
      eos_token_id=ends or (),
      pad_token_id=tokenizer.pad_id,
    )
    out.append(np.asarray(new)[: stop - start])
  return np.concatenate(out)


def decode_answer(row, ends, tokenizer: data.Tokenizer) -> str:
  """The text of greedy tokens `row` up to the first end token."""
  cut = np.flatnonzero(np.isin(row, ends))
  row = row[: cut[0]] if len(cut) else row
  return tokenizer.decode(row, skip_special_tokens=True)


def generate_answers(
  model,
  variables,
  prompts: Prompts,
  tokenizer: data.Tokenizer,
  batch_size: int,
  max_new_tokens: int,
) -> list[str]:
  """Each prompt's greedy answer, decoded up to its end token."""
  ends = end_ids(tokenizer, model.config)
  tokens = generate_ids(
    model, variables, prompts, tokenizer, batch_size, max_new_tokens
  )
  return [decode_answer(row, ends, tokenizer) for row in tokens]


def same_answer(said: str, expected: str) -> bool:
  """Equal up to case, surrounding whitespace and a final full stop."""

  def norm(text: str) -> str:
    return text.strip().rstrip(".").strip().lower()

  return norm(said) == norm(expected)


def accuracy(predicted: Sequence[str], answers: Sequence[str]) -> float:
  """Share of answers that are the expected ones (`same_answer`)."""
  pairs = zip(predicted, answers, strict=True)
  return sum(same_answer(p, a) for p, a in pairs) / max(len(answers), 1)


def evaluate(
  model, params, frozen, prompts, tokenizer, batch_size, max_new_tokens
):
  """(accuracy, answers) of the model with trainable `params`, each answer
  generated greedily up to `max_new_tokens`."""
  variables = qnn.merge_trees(params, frozen)
  predicted = generate_answers(
    model, variables, prompts, tokenizer, batch_size, max_new_tokens
  )
  return accuracy(predicted, prompts.answers), predicted


def _pad_rows(x: np.ndarray, rows: int) -> np.ndarray:
  if len(x) == rows:
    return x
  return np.concatenate([x, np.repeat(x[:1], rows - len(x), axis=0)])
