"""lm-eval's requests as token ids, as its Hugging Face backend makes them.

Pure Python, no lm_eval import (read lm_eval 0.4.13's api/model.py
`TemplateLM` and models/huggingface.py `HFLM` for the reference):

- a (context, continuation) pair: the context's trailing whitespace moves
  into the continuation; the pair is encoded jointly and split at the
  encoded context's length; an empty context becomes the prefix token (or
  the continuation's first token when that is the prefix token already);
- a scored row is (context + continuation)[-(max_length + 1):][:-1], the
  last len(continuation) positions scored;
- rolling windows (loglikelihood_rolling): the first predicts up to
  `max_length` tokens after the prefix token, each next one the following
  `max_length` tokens with as much context as fits, made disjoint;
- requests run longest first (ties by token ids), in rows padded to a few
  bucket lengths; a last, short batch gets a power of two of rows.
"""

import dataclasses
from collections.abc import Callable, Sequence

Encode = Callable[[str], list[int]]


def encode_pair(
  encode: Encode, context: str, continuation: str
) -> tuple[list[int], list[int]]:
  """(context ids, continuation ids) of a non-empty context."""
  if not context:
    raise ValueError("encode_pair needs a non-empty context")
  spaces = len(context) - len(context.rstrip())
  if spaces:
    continuation = context[-spaces:] + continuation
    context = context[:-spaces]
  whole = encode(context + continuation)
  n = len(encode(context))
  return whole[:n], whole[n:]


def empty_context(
  continuation_ids: list[int], prefix_id: int
) -> tuple[list[int], list[int]]:
  """(context, continuation) ids of a request with an empty context."""
  if continuation_ids and continuation_ids[0] == prefix_id:
    return continuation_ids[:1], continuation_ids[1:]
  return [prefix_id], continuation_ids


@dataclasses.dataclass(frozen=True)
class Scored:
  """One row to score: `inputs` fed to the model, the last `n_scored`
  positions scored against `targets` (the continuation's ids)."""

  inputs: list[int]
  targets: list[int]

  @property
  def n_scored(self) -> int:
    return len(self.targets)


def scored_row(
  context: list[int], continuation: list[int], max_length: int
) -> Scored:
  """The row of a (context, continuation) pair, cut from the left."""
  if not context or not continuation:
    raise ValueError("a scored row needs a context and a continuation")
  if len(continuation) > max_length:
    raise ValueError(
      f"a continuation of {len(continuation)} tokens exceeds the maximum "
      f"length {max_length}"
    )
  whole = (context + continuation)[-(max_length + 1) :]
  return Scored(whole[:-1], list(continuation))


def rolling_windows(
  tokens: Sequence[int], prefix_id: int, max_length: int
) -> list[tuple[list[int], list[int]]]:
  """lm-eval's disjoint (context, prediction) windows over `tokens` with
  a context of 1 (`get_rolling_token_windows` + `make_disjoint_window`)."""
  tokens = list(tokens)
  if max_length < 1:
    raise ValueError(f"max_length must be >= 1, got {max_length}")
  if not tokens:
    return []
  first = min(max_length, len(tokens))
  windows = [([prefix_id] + tokens[: first - 1], tokens[:first])]
  done = first
  while done < len(tokens):
    n = min(len(tokens) - done, max_length)
    end = done + n
    context = tokens[max(0, end - max_length - 1) : end - 1]
    windows.append((context, tokens[end - n : end]))
    done = end
  return [(c[: len(c) - (len(p) - 1)], p) for c, p in windows]


def longest_first(rows: Sequence[Sequence[int]]) -> list[int]:
  """Indices of `rows` longest first, ties by the ids (lm-eval's order)."""
  return sorted(range(len(rows)), key=lambda i: (-len(rows[i]), tuple(rows[i])))


def bucket(length: int, max_length: int, smallest: int = 32) -> int:
  """The padded length of a row: the next power of two from `smallest`, or
  from 64 up the midpoint below it (48, 96, 192, ...: 3/4 of it), so that
  padding is at most a third of a padded row, not a half, at two programs
  per octave; at most `max_length` (itself a bucket)."""
  if length > max_length:
    raise ValueError(f"a row of {length} tokens exceeds {max_length}")
  size = smallest
  while size < length:
    size *= 2
  if size >= 64 and length <= size * 3 // 4 and size * 3 // 4 >= smallest:
    size = size * 3 // 4
  return min(size, max_length)


def batch_rows(remaining: int, batch_size: int) -> int:
  """Rows of the next batch: `batch_size`, or for the last one the next
  power of two of what remains (fewer copies of a row to fill it)."""
  if remaining >= batch_size:
    return batch_size
  rows = 1
  while rows < remaining:
    rows *= 2
  return min(rows, batch_size)


def cut_at_stops(text: str, stops: Sequence[str]) -> str:
  """The text before the first of each stop string in turn (lm-eval's
  `postprocess_generated_text`; empty stops ignored)."""
  for stop in stops:
    if stop:
      text = text.split(stop)[0]
  return text


@dataclasses.dataclass(frozen=True)
class Generation:
  """A generate_until request's settings, as lm-eval normalises them."""

  until: tuple[str, ...]
  max_gen_toks: int
  temperature: float = 0.0
  top_k: int = 0
  top_p: float = 1.0


_MAX_ALIASES = ("max_gen_toks", "max_new_tokens", "max_tokens")
_SAMPLING = ("temperature", "top_k", "top_p", "do_sample")


def generation(
  kwargs: dict, eos_text: str | None, default_max: int = 256
) -> Generation:
  """A request's gen_kwargs read as lm-eval's HF backend reads them: stop
  strings (with the EOS token's text), the first of the max-token aliases
  (`max_gen_toks`, `max_new_tokens`, `max_tokens`), greedy unless
  `do_sample` or a temperature > 0."""
  unknown = sorted(set(kwargs) - {"until", *_MAX_ALIASES, *_SAMPLING})
  if unknown:
    raise ValueError(f"gen_kwargs: unsupported {unknown}")
  until = kwargs.get("until") or []
  until = [until] if isinstance(until, str) else list(until)
  if eos_text is not None and eos_text not in until:
    until.append(eos_text)
  given = [kwargs[k] for k in _MAX_ALIASES if kwargs.get(k) is not None]
  max_gen_toks = int(given[0]) if given else default_max
  temperature = float(kwargs.get("temperature", 0.0))
  if kwargs.get("do_sample") is False:
    temperature = 0.0
  return Generation(
    tuple(until),
    max_gen_toks,
    temperature,
    int(kwargs.get("top_k") or 0),
    float(kwargs.get("top_p") or 1.0),
  )
