"""The train step: accumulation, frozen bytes, dropout keyed by step."""

import jax
import numpy as np
import optax
import pytest

from qlora_jax import models
from qlora_jax import nn as qnn
from qlora_jax.engine import sharding, steps

LLAMA = "tests/data/hf/llama_gqa"


def _setup(dropout=0.0):
  lm = models.from_pretrained(
    LLAMA,
    lora={"rank": 4, "alpha": 8, "dropout": dropout},
    quant={"data_type": "nf4", "block_size": 32, "double_quant": True},
  )
  trainable, frozen = qnn.split_trainable(lm.variables)
  ref = np.load(f"{LLAMA}/reference.npz")
  ids = np.tile(ref["input_ids"], (2, 1))  # [4, 10]
  batch = {
    "input_ids": ids[:, :-1],
    "segment_ids": np.ones_like(ids[:, :-1]),
    "positions": np.tile(np.arange(9, dtype=np.int32), (4, 1)),
    "targets": ids[:, 1:],
    "loss_mask": np.r_[np.ones((2, 9)), np.eye(9)[:2] + 1].astype(np.float32),
  }
  return lm, trainable, frozen, batch


def _step(lm, tx, accum):
  return jax.jit(
    lambda s, b, f: steps.train_step(
      s, b, f, model=lm.model, task="causal_lm", tx=tx, accum=accum
    )
  )


def test_accumulation_equals_one_big_batch():
  lm, trainable, frozen, batch = _setup()
  tx = optax.sgd(0.1)
  s0 = steps.create_state(trainable, tx, 0)
  big, m_big = _step(lm, tx, 1)(s0, batch, frozen)
  acc, m_acc = _step(lm, tx, 2)(s0, batch, frozen)
  # Weighted sums split in two micro-batches: equal up to f32 rounding.
  assert float(m_acc["weight"]) == float(m_big["weight"])
  np.testing.assert_allclose(m_acc["loss"], m_big["loss"], rtol=1e-6)
  for a, b in zip(
    jax.tree.leaves(acc.params), jax.tree.leaves(big.params), strict=True
  ):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_frozen_base_is_bit_identical_after_steps():
  """Three AdamW steps (weight decay 0.1, so that every leaf the optimizer
  holds moves) of the library's jitted step, `jit_train_step`, with its
  shardings and donation over a 1 x 1 mesh. The reference is the names:
  every leaf but the LoRA adapters (the whole "base" collection: packed
  codes and scales, norms, embeddings) keeps, exactly, the bytes of a
  NumPy copy taken before `split_trainable`, in the model after training
  (the trained state merged with the frozen tree the step was given). The
  state, and Adam's moments, hold the adapters and nothing else, and every
  adapter moved: a split or a step that trained any frozen leaf fails."""
  lm, _, _, batch = _setup()
  before = {
    path: [np.array(a) for a in jax.tree.leaves(leaf)]
    for path, leaf in qnn.flatten(lm.variables).items()
  }
  adapters = {p for p in before if p[-1] in ("lora_a", "lora_b")}
  assert adapters and len(adapters) < len(before)
  trainable, frozen = qnn.split_trainable(lm.variables)
  tx = optax.adamw(1e-2, weight_decay=0.1)
  state = steps.create_state(trainable, tx, 0)
  mesh = sharding.make_mesh(1, 1, jax.devices()[:1])
  state_sh = sharding.tree_shardings(mesh, state)
  step = steps.jit_train_step(
    lm.model,
    "causal_lm",
    tx,
    1,
    state_sh,
    sharding.batch_sharding(mesh),
    sharding.tree_shardings(mesh, frozen),
  )
  state = jax.device_put(state, state_sh)
  for _ in range(3):
    state, metrics = step(state, batch, frozen)
  assert int(state.step) == 3 and bool(metrics["params_finite"])
  assert set(qnn.flatten(state.params)) == adapters
  mu = optax.tree_utils.tree_get(state.opt_state, "mu")
  assert set(qnn.flatten(mu)) == adapters
  after = qnn.flatten(qnn.merge_trees(state.params, frozen))
  assert after.keys() == before.keys()
  for path, old in before.items():
    new = [np.array(a) for a in jax.tree.leaves(after[path])]
    if path in adapters:
      assert not np.array_equal(new[0], old[0]), path
      continue
    assert len(new) == len(old), path
    for a, b in zip(old, new, strict=True):
      assert a.dtype == b.dtype and a.tobytes() == b.tobytes(), path


def test_dropout_is_keyed_by_the_step():
  lm, trainable, frozen, batch = _setup(dropout=0.5)
  tx = optax.sgd(0.0)  # the state does not change: only the key does
  state = steps.create_state(trainable, tx, 0)
  state = jax.tree.map(lambda a: a, state)
  state = state.replace(
    params=jax.tree.map(lambda a: a + 0.01, state.params)  # B != 0
  )
  step = _step(lm, tx, 1)
  s1, m1 = step(state, batch, frozen)
  _, m1b = step(state, batch, frozen)
  _, m2 = step(s1, batch, frozen)
  assert float(m1["loss"]) == float(m1b["loss"])  # same step, same masks
  assert float(m1["loss"]) != float(m2["loss"])  # next step, new masks


@pytest.mark.parametrize(
  "n, most, chunk, chunks",
  [
    (512, 131, 128, 4),  # 131 would pad 12 tokens
    (512, 262, 256, 2),
    (500, 131, 128, 4),  # an even 125, rounded up to 8s
    (36, 7, 6, 6),  # 6 or fewer tokens per chunk: not rounded
    (5, 5, 5, 1),
    (1000, 1000, 1000, 1),
  ],
)
def test_lm_chunks_split_evenly(n, most, chunk, chunks):
  """The fewest chunks of at most `most` tokens, split evenly and rounded
  up to a multiple of 8 tokens where that stays within `most`: exact."""
  from qlora_jax.engine import losses as tasks

  assert tasks.lm_chunks(n, most) == (chunk, chunks)
  assert chunk <= most and chunks * chunk >= n
  assert chunks == -(-n // most)


@pytest.mark.parametrize("head", ["frozen", "trained"])
def test_chunked_lm_loss_equals_the_full_logits_loss(monkeypatch, head):
  """Both chunked paths (rematerialised, and fused: the gradients taken per
  chunk in the forward pass) against the loss of all logits at once, with
  the head frozen (LoRA) or trained (in the differentiated tree): sums to
  1e-6 relative, gradients to 1e-5 relative to each gradient's largest
  entry (float32 sums in other orders)."""
  from qlora_jax.engine import losses as tasks

  lm, trainable, frozen, batch = _setup()
  if head == "trained":
    trainable, frozen = qnn.split_trainable(lm.variables, ["lm_head"])
    assert any("lm_head" in "/".join(k) for k in qnn.flatten(trainable))
  # 96 vocab x 16 tokens per chunk: 36 tokens in 3 chunks of 16 (an even
  # split, 12, rounded up to 8s), the last padded.
  monkeypatch.setattr(tasks, "LM_CHUNK_ELEMENTS", 96 * 16)
  assert tasks.lm_chunks(36, 16) == (16, 3)

  def chunked(t):
    v = qnn.merge_trees(t, frozen)
    return tasks.batch_sums("causal_lm", lm.model, v, batch, True)

  def full(t):
    out = tasks.logits(lm.model, qnn.merge_trees(t, frozen), batch, True)
    return tasks.loss_sums("causal_lm", out, batch)

  def fused(t):
    return tasks.batch_sums("causal_lm", lm.model, t, batch, True, None, frozen)

  b = jax.jit(full)(trainable)
  gb = jax.jit(jax.grad(lambda t: full(t)["loss"]))(trainable)
  for fn in (chunked, fused):
    a = jax.jit(fn)(trainable)
    for k in ("loss", "weight", "correct"):
      np.testing.assert_allclose(a[k], b[k], rtol=1e-6)
    # 2x the loss: the cotangent of the loss scales the stored gradients.
    ga = jax.jit(jax.grad(lambda t, fn=fn: 2.0 * fn(t)["loss"]))(trainable)
    for x, y in zip(jax.tree.leaves(ga), jax.tree.leaves(gb), strict=True):
      scale = float(np.abs(2.0 * y).max())
      np.testing.assert_allclose(x, 2.0 * y, rtol=1e-5, atol=1e-5 * scale)
