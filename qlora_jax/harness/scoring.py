"""Scoring and generation of lm-eval requests through a JAX causal LM.

Rows run longest first in batches of `batch_size` rows (the last one of
a power of two of rows, filled with copies of its first row), each batch
padded to its longest row's bucket length (`requests.bucket`): a task
compiles one program per bucket and row count, not one per batch.
Log-probabilities are float32 and taken over the whole vocabulary; the
head runs over the scored positions alone (a multiple-choice answer's
few tokens, not the whole row: most of a row's head work otherwise),
in chunks of positions so that a batch never holds [B, L, vocab] logits.

Rows that share everything but their scored positions (the choices of a
multiple-choice question: one context, several continuations) run the
shared prefix once: it fills a KV cache, which each row's scored
positions then extend (`_shared_scores`). Rows whose scored inputs are
the same too (one-token answers: only the target differs) share one
suffix row and read their targets from its distributions, as lm-eval's
HFLM does for one-token continuations. The log-probabilities are the same
as a whole row's, to float32 rounding.
"""

import dataclasses
import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from qlora_jax.harness import requests
from qlora_jax.models import generation
from qlora_jax.models.attention import KVCache

HEAD_CHUNK = 128  # positions per head call (SmolLM2: 25 MB a row)


@dataclasses.dataclass
class Model:
  """A causal LM ready to score: its module, variables and context."""

  module: object
  variables: dict
  max_length: int
  pad_id: int


@functools.partial(jax.jit, static_argnames=("module",))
def _token_scores(module, variables, inputs, segments, positions, targets):
  """(log p(target), target is the argmax), float32 [B, K], at the K
  scored `positions` of each row: the head runs over those alone."""
  hidden = module.apply(variables, inputs, segments, return_hidden=True)
  hidden = jnp.take_along_axis(hidden, positions[..., None], axis=1)
  picked, greedy = _head_scores(module, variables, hidden, targets[..., None])
  return picked[..., 0], greedy[..., 0]


@functools.partial(jax.jit, static_argnames=("module",))
def _shared_scores(
  module, variables, prefix, prefix_mask, owner, suffix, suffix_mask, targets
):
  """`_token_scores` of rows made of a shared prefix and a suffix: the G
  left-padded prefixes [G, P] fill a KV cache once, row r takes prefix
  `owner[r]`'s cache and feeds its right-padded suffix [R, K], whose K
  positions are the scored ones, each read for J targets [R, K, J]."""
  c = module.config
  groups, width = prefix.shape
  rows, k = suffix.shape
  cache = KVCache.zeros(
    c.num_layers,
    groups,
    width + k,
    c.num_kv_heads,
    c.head_dim,
    module.opts.dtype,
  )
  positions = jnp.maximum(jnp.cumsum(prefix_mask, axis=1) - 1, 0)
  _, cache = module.apply(
    variables, prefix, prefix_mask, positions, cache=cache, return_hidden=True
  )
  cache = KVCache(
    cache.key[:, owner],
    cache.value[:, owner],
    cache.segment_ids[owner],
    cache.index,
  )
  start = jnp.sum(prefix_mask, axis=1)[owner]
  positions = start[:, None] + jnp.arange(k)[None]
  hidden, _ = module.apply(
    variables, suffix, suffix_mask, positions, cache=cache, return_hidden=True
  )
  return _head_scores(module, variables, hidden, targets)


def _head_scores(module, variables, hidden, targets):
  """(log p(target), target is the argmax) of hidden states [B, K, width]
  for targets [B, K, J] (J targets read from each position's one
  distribution), the head applied in chunks of positions."""
  b, k, width = hidden.shape
  chunks = k // HEAD_CHUNK if k % HEAD_CHUNK == 0 else 1
  h = hidden.reshape(b, chunks, -1, width).swapaxes(0, 1)
  t = targets.reshape(b, chunks, -1, targets.shape[-1]).swapaxes(0, 1)

  def one(xs):
    hh, tt = xs
    logits = module.apply(variables, None, hidden=hh).astype(jnp.float32)
    logp = jax.nn.log_softmax(logits, axis=-1)
    picked = jnp.take_along_axis(logp, tt, axis=-1)
    return picked, jnp.argmax(logits, axis=-1)[..., None] == tt

  picked, greedy = jax.lax.map(one, (h, t))
  return (
    picked.swapaxes(0, 1).reshape(targets.shape),
    greedy.swapaxes(0, 1).reshape(targets.shape),
  )


def _batches(n: int, batch_size: int):
  """(start, rows) of each batch over `n` sorted rows."""
  start = 0
  while start < n:
    size = requests.batch_rows(n - start, batch_size)
    yield start, size
    start += size


def _fill(rows: list, size: int) -> list:
  return rows + [rows[0]] * (size - len(rows))


def _prefix(row: requests.Scored) -> tuple[int, ...]:
  """The inputs before the row's scored positions."""
  return tuple(row.inputs[: len(row.inputs) - row.n_scored])


def score(
  model: Model, rows: Sequence[requests.Scored], batch_size: int
) -> list[tuple[float, bool]]:
  """(sum of the scored targets' log-probs, all of them greedy) per row:
  rows sharing a prefix with others run it once (`score_shared`), the
  rest whole."""
  groups: dict[tuple[int, ...], list[int]] = {}
  for i, row in enumerate(rows):
    groups.setdefault(_prefix(row), []).append(i)
  shared = [i for p, g in groups.items() if p and len(g) > 1 for i in g]
  alone = sorted(set(range(len(rows))) - set(shared))
  out: list[tuple[float, bool] | None] = [None] * len(rows)
  for part, scores in (
    (shared, score_shared(model, [rows[i] for i in shared], batch_size)),
    (alone, score_whole(model, [rows[i] for i in alone], batch_size)),
  ):
    for i, s in zip(part, scores, strict=True):
      out[i] = s
  return out


def _totals(picked, greedy, j: int, m: int) -> tuple[float, bool]:
  return (
    float(picked[j, :m].sum(dtype=np.float64)),
    bool(greedy[j, :m].all()),
  )


def score_shared(
  model: Model, rows: Sequence[requests.Scored], batch_size: int
) -> list[tuple[float, bool]]:
  """`score_whole`'s values, each distinct prefix (non-empty) run once:
  `batch_size` prefixes a call, longest first."""
  groups: dict[tuple[int, ...], list[int]] = {}
  for i, row in enumerate(rows):
    groups.setdefault(_prefix(row), []).append(i)
  prefixes = list(groups)
  if not all(prefixes):
    raise ValueError("score_shared needs rows with a non-empty prefix")
  order = requests.longest_first(prefixes)
  out: list[tuple[float, bool] | None] = [None] * len(rows)
  for start, size in _batches(len(order), batch_size):
    chosen = _fill([prefixes[i] for i in order[start : start + size]], size)
    width = requests.bucket(len(chosen[0]), model.max_length)
    prefix = np.full((size, width), model.pad_id, np.int32)
    prefix_mask = np.zeros((size, width), np.int32)
    for g, p in enumerate(chosen):
      prefix[g, width - len(p) :] = p
      prefix_mask[g, width - len(p) :] = 1
    # Rows of one prefix whose scored inputs are the same (a multiple-choice
    # question's one-token answers: only their targets differ) share one
    # suffix row, each reading its targets from that row's distributions.
    suffixes: dict[tuple, list[int]] = {}
    for g, p in enumerate(chosen[: min(size, len(order) - start)]):
      for i in groups[p]:
        r = rows[i]
        key = (g, tuple(r.inputs[len(r.inputs) - r.n_scored :]))
        suffixes.setdefault(key, []).append(i)
    keys = list(suffixes)
    n = requests.batch_rows(len(keys), 1 << 30)
    share = requests.batch_rows(max(map(len, suffixes.values())), 1 << 30)
    k = requests.bucket(max(len(key[1]) for key in keys), model.max_length, 1)
    owner = np.zeros(n, np.int32)
    suffix = np.full((n, k), model.pad_id, np.int32)
    suffix_mask = np.zeros((n, k), np.int32)
    targets = np.zeros((n, k, share), np.int32)
    for j in range(n):
      g, tokens = keys[j % len(keys)]  # filler rows repeat the first ones
      owner[j] = g
      suffix[j, : len(tokens)] = tokens
      suffix_mask[j, : len(tokens)] = 1
      members = suffixes[keys[j % len(keys)]]
      for s in range(share):
        targets[j, : len(tokens), s] = rows[members[s % len(members)]].targets
    picked, greedy = jax.device_get(
      _shared_scores(
        model.module,
        model.variables,
        prefix,
        prefix_mask,
        owner,
        suffix,
        suffix_mask,
        targets,
      )
    )
    for j, key in enumerate(keys):
      for s, i in enumerate(suffixes[key]):
        out[i] = _totals(picked[..., s], greedy[..., s], j, rows[i].n_scored)
  return out


def score_whole(
  model: Model, rows: Sequence[requests.Scored], batch_size: int
) -> list[tuple[float, bool]]:
  """(sum of the scored targets' log-probs, all of them greedy) per row,
  each row run whole."""
  out: list[tuple[float, bool] | None] = [None] * len(rows)
  order = requests.longest_first([r.inputs + r.targets[-1:] for r in rows])
  for start, size in _batches(len(order), batch_size):
    chosen = order[start : start + size]
    batch = _fill([rows[i] for i in chosen], size)
    width = requests.bucket(len(batch[0].inputs), model.max_length)
    k = requests.bucket(max(r.n_scored for r in batch), width, smallest=1)
    ids = np.full((size, width), model.pad_id, np.int32)
    segments = np.zeros((size, width), np.int32)
    positions = np.zeros((size, k), np.int32)
    targets = np.zeros((size, k), np.int32)
    for j, r in enumerate(batch):
      n, m = len(r.inputs), r.n_scored
      ids[j, :n] = r.inputs
      segments[j, :n] = 1
      positions[j, :m] = np.arange(n - m, n)
      positions[j, m:] = n - 1  # filler, not read back
      targets[j, :m] = r.targets
    picked, greedy = jax.device_get(
      _token_scores(
        model.module, model.variables, ids, segments, positions, targets
      )
    )
    for j, i in enumerate(chosen):
      out[i] = _totals(picked, greedy, j, rows[i].n_scored)
  return out


def generate(
  model: Model,
  prompts: Sequence[list[int]],
  settings: requests.Generation,
  end_ids: Sequence[int],
  batch_size: int,
  rng: jax.Array,
) -> list[list[int]]:
  """New tokens of each prompt (before its first end token; `end_ids`
  may be empty), prompts cut from the left to the room `max_gen_toks`
  leaves."""
  room = model.max_length - settings.max_gen_toks
  if room < 1:
    raise ValueError(
      f"max_gen_toks {settings.max_gen_toks} leaves no room for a prompt "
      f"in the maximum length {model.max_length}"
    )
  prompts = [list(p)[-room:] for p in prompts]
  out: list[list[int] | None] = [None] * len(prompts)
  order = requests.longest_first(prompts)
  for start, size in _batches(len(order), batch_size):
    chosen = order[start : start + size]
    batch = _fill([prompts[i] for i in chosen], size)
    width = requests.bucket(len(batch[0]), room)
    ids = np.full((size, width), model.pad_id, np.int32)
    mask = np.zeros((size, width), np.int32)
    for j, p in enumerate(batch):
      ids[j, width - len(p) :] = p
      mask[j, width - len(p) :] = 1
    rng, sub = jax.random.split(rng)
    new = generation.generate(
      model.module,
      model.variables,
      ids,
      mask,
      max_new_tokens=settings.max_gen_toks,
      eos_token_id=tuple(end_ids),
      pad_token_id=model.pad_id,
      temperature=settings.temperature,
      top_k=settings.top_k,
      top_p=settings.top_p,
      rng=sub,
    )
    for j, i in enumerate(chosen):
      row = [int(t) for t in np.asarray(new[j])]
      ends = [k for k, t in enumerate(row) if t in end_ids]
      out[i] = row[: ends[0]] if ends else row
  return out
