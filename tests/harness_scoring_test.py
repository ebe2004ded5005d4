"""Batched, bucketed scoring and generation (harness.scoring) on the tiny
Llama fixture, against the model's full logits row by row and against
unpadded greedy generation; no lm-eval needed."""

import pathlib

import jax
import numpy as np
import pytest

from qlora_jax import models
from qlora_jax.harness import requests, scoring

HF = pathlib.Path(__file__).parent / "data" / "hf"


def _model(name="llama_gqa"):
  lm = models.from_pretrained(HF / name)
  return lm, scoring.Model(lm.model, lm.variables, 64, 0)


def _reference(lm, rows):
  """(log-likelihood, is_greedy) of each row from the model's full logits
  in float64, the rows right-padded (causal: padding after a row changes
  none of its logits)."""
  ids = np.zeros((len(rows), max(len(r.inputs) for r in rows)), np.int32)
  for i, row in enumerate(rows):
    ids[i, : len(row.inputs)] = row.inputs
  logits = np.asarray(lm.model.apply(lm.variables, ids), np.float64)
  out = []
  for i, row in enumerate(rows):
    full = logits[i, : len(row.inputs)][-row.n_scored :]
    logp = full - np.log(np.exp(full).sum(-1, keepdims=True))
    out.append(
      (
        sum(logp[j, t] for j, t in enumerate(row.targets)),
        all(full[j].argmax() == t for j, t in enumerate(row.targets)),
      )
    )
  return out


def test_scores_equal_the_full_logits_of_each_row():
  lm, model = _model()
  rng = np.random.default_rng(0)
  rows = [
    requests.Scored(
      [int(t) for t in rng.integers(1, 100, n)],
      [int(t) for t in rng.integers(1, 100, k)],
    )
    for n, k in ((5, 2), (20, 3), (9, 1))
  ]
  # One call on the rows right-padded to 20 (causal: padding after a row
  # changes none of its logits), in float64.
  ids = np.zeros((3, 20), np.int32)
  for i, row in enumerate(rows):
    ids[i, : len(row.inputs)] = row.inputs
  logits = np.asarray(lm.model.apply(lm.variables, ids), np.float64)
  # Make the last row's target the greedy token, so is_greedy is True.
  rows[2] = requests.Scored(rows[2].inputs, [int(logits[2, 8].argmax())])
  got = scoring.score(model, rows, batch_size=2)
  for i, (row, (logp, greedy)) in enumerate(zip(rows, got, strict=True)):
    n = len(row.inputs)
    full = logits[i, :n]
    logp_all = full - np.log(np.exp(full).sum(-1, keepdims=True))
    tail = logp_all[-row.n_scored :]
    want = sum(tail[i, t] for i, t in enumerate(row.targets))
    np.testing.assert_allclose(logp, want, rtol=1e-5)
    assert greedy == all(
      tail[i].argmax() == t for i, t in enumerate(row.targets)
    )
  assert got[2][1]


def test_generation_equals_unpadded_greedy_generation():
  lm, model = _model()
  prompts = [[5, 6, 7, 8, 1, 2, 3], [9, 10, 11, 12, 13, 14, 15]]
  settings = requests.Generation((), max_gen_toks=5)
  # Batches of 4 rows left-padded to 32 against the prompts as they are.
  got = scoring.generate(model, prompts, settings, [], 4, jax.random.key(0))
  want = models.generate(
    lm.model,
    lm.variables,
    np.asarray(prompts),
    max_new_tokens=5,
    eos_token_id=(),
  )
  assert got == np.asarray(want).tolist()


@pytest.mark.parametrize("name", ["llama_gqa", "gemma3_text", "gpt2"])
def test_rows_sharing_a_context_score_as_whole_rows(name):
  # Three contexts (7, 30 and 12 tokens) with 3 to 5 continuations of 1 to
  # 4 tokens each, one with five one-token answers, and one row alone: the
  # shared rows run their context once through the KV cache and must score
  # as the whole rows do (float32 against the float64 reference: 1e-5
  # relative).
  lm, model = _model(name)
  rng = np.random.default_rng(1)
  rows = []
  for n, choices in ((7, 3), (30, 5), (12, 4)):
    context = [int(t) for t in rng.integers(1, 90, n)]
    for _ in range(choices):
      cont = [int(t) for t in rng.integers(1, 90, rng.integers(1, 5))]
      rows.append(requests.scored_row(context, cont, 64))
  # A question whose five answers are one token each, one of them the
  # greedy token: they share one suffix row, each reading its own target.
  context = [int(t) for t in rng.integers(1, 90, 14)]
  last = lm.model.apply(lm.variables, np.asarray([context], np.int32))
  top = int(np.asarray(last)[0, -1].argmax())
  for t in (top, *sorted({5, 17, 33, 61, 77} - {top})[:4]):
    rows.append(requests.scored_row(context, [t], 64))
  rows.append(requests.scored_row([3, 4, 5], [6, 7], 64))
  ref = _reference(lm, rows)
  # Make one continuation greedy, so is_greedy is checked both ways.
  first = rows[0]
  ids = np.asarray([first.inputs[: len(first.inputs) - first.n_scored + 1]])
  top = int(np.asarray(lm.model.apply(lm.variables, ids))[0, -1].argmax())
  rows[0] = requests.Scored(first.inputs[: len(ids[0])], [top])
  ref[0] = _reference(lm, rows[:1])[0]
  got = scoring.score(model, rows, batch_size=2)
  for (logp, greedy), (want, want_greedy) in zip(got, ref, strict=True):
    np.testing.assert_allclose(logp, want, rtol=1e-5)
    assert greedy == want_greedy
  assert got[0][1]
  assert [g for _, g in got[-6:-1]] == [True] + [False] * 4
