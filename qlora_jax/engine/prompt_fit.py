"""Prompts made to fit before anything generates: the generation options
checked (before a model loads), and prompts longer than the room a model's
context leaves cut from the left, with a warning.

A model's context is `config.max_positions` (SmolLM2: 8,192 tokens). A
prompt of P tokens with N new ones needs P + N positions, and its prefill
attends over all of them at once: a 100,000-character line would ask for
tens of GB. So a prompt keeps its last `room` tokens (the end of the
question and the generation prompt), `room` being the context less the new
tokens.
"""

from collections.abc import Sequence

from absl import logging


def check_options(
  max_new_tokens: int,
  temperature: float = 0.0,
  top_k: int = 0,
  top_p: float = 1.0,
  batch_size: int | None = None,
) -> None:
  """Refuses generation options no generation can use, naming each.

  Raises:
    ValueError: every bad option at once, e.g. "max_new_tokens must be
      >= 1, got 0; temperature must be >= 0 (0: greedy), got -1.0".
  """
  problems = []
  if max_new_tokens < 1:
    problems.append(f"max_new_tokens must be >= 1, got {max_new_tokens}")
  if not temperature >= 0:  # NaN too
    problems.append(f"temperature must be >= 0 (0: greedy), got {temperature}")
  if top_k < 0:
    problems.append(f"top_k must be >= 0 (0: all tokens), got {top_k}")
  if not 0.0 < top_p <= 1.0:
    problems.append(f"top_p must be in (0, 1], got {top_p}")
  if batch_size is not None and batch_size < 1:
    problems.append(f"batch_size must be >= 1, got {batch_size}")
  if problems:
    raise ValueError("; ".join(problems))


def room(context: int, max_new_tokens: int) -> tuple[int, str]:
  """(prompt tokens a `context`-token model has beside `max_new_tokens`,
  what that limit is, in words).

  Raises:
    ValueError: `max_new_tokens` leaves no room for a prompt.
  """
  if max_new_tokens >= context:
    raise ValueError(
      f"max_new_tokens {max_new_tokens} leaves no room for a prompt in the "
      f"model's context of {context} tokens: ask for fewer new tokens"
    )
  words = f"the model's {context}-token context less {max_new_tokens} new"
  return context - max_new_tokens, words


def fit(
  rows: Sequence[Sequence[int]],
  room: int,
  what: str,
  limit: str,
  log=logging.warning,
) -> list[list[int]]:
  """`rows` (token ids), each longer than `room` cut to its last `room`
  tokens; `log` (a warning by default) names how many `what`s were cut, by
  which `limit` (in words), and the longest."""
  cut = [i for i, r in enumerate(rows) if len(r) > room]
  if cut:
    log(
      "%d %s(s) longer than %s (%d tokens; the longest has %d): their first "
      "tokens are dropped",
      len(cut),
      what,
      limit,
      room,
      max(len(rows[i]) for i in cut),
    )
  return [list(r[-room:]) if len(r) > room else list(r) for r in rows]
