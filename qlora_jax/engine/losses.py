"""Losses and metrics of the training tasks, as sums over a batch.

Every model is called as `model.apply(variables, input_ids,
segment_ids=..., positions=..., deterministic=...)` and returns float32
logits: [B, num_labels] for classification, [B, L, vocab] for language
modelling. Losses are returned as sums with their weight (examples or
target tokens) so that gradient accumulation and sharded evaluation give
exactly the mean over the whole batch.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax

from qlora_jax import nn as qnn
from qlora_jax.engine.settings import CAUSAL_LM, CLASSIFICATION


def logits(model, variables, batch, deterministic: bool, rngs=None):
  return model.apply(
    variables,
    batch["input_ids"],
    segment_ids=batch["segment_ids"],
    positions=batch["positions"],
    deterministic=deterministic,
    rngs=rngs,
  )


def loss_sums(task: str, out: jnp.ndarray, batch) -> dict[str, jnp.ndarray]:
  """{"loss": summed loss, "weight": its weight, "correct": right answers}.

  Rows of an evaluation batch that are padding carry `weights` 0.
  """
  if task == CLASSIFICATION:
    labels = batch["labels"]
    w = batch.get("weights", jnp.ones(labels.shape, jnp.float32))
    ce = optax.softmax_cross_entropy_with_integer_labels(out, labels)
    correct = (jnp.argmax(out, -1) == labels).astype(jnp.float32)
    return {
      "loss": jnp.sum(ce * w),
      "weight": jnp.sum(w),
      "correct": jnp.sum(correct * w),
    }
  mask = batch["loss_mask"].astype(jnp.float32)
  if "weights" in batch:
    mask = mask * batch["weights"][:, None]
  ce = optax.softmax_cross_entropy_with_integer_labels(out, batch["targets"])
  correct = (jnp.argmax(out, -1) == batch["targets"]).astype(jnp.float32)
  return {
    "loss": jnp.sum(ce * mask),
    "weight": jnp.sum(mask),
    "correct": jnp.sum(correct * mask),
  }


# Logits elements per chunk of the language-modelling loss (32 MiB of f32).
LM_CHUNK_ELEMENTS = 1 << 23


def lm_chunks(n: int, most: int) -> tuple[int, int]:
  """(tokens per chunk, chunks) for `n` tokens, at most `most` per chunk.

  The fewest chunks, split evenly (rounded up to a multiple of 8 tokens),
  so that padding tokens cost few head FLOPs. Larger chunks make faster
  dots: on 2 CPU cores, 512 tokens of a 32,000 vocabulary (bench_train's
  QLoRA step) ran ~7% faster in 2 chunks of 256 than in 4 of 131 (12
  padding tokens) and ~6% faster than in 4 of 128.
  """
  chunks = -(-n // most)
  chunk = -(-n // chunks)
  if chunk > 8:
    chunk = min(most, -(-chunk // 8) * 8)
  return chunk, -(-n // chunk)


def batch_sums(
  task, model, variables, batch, deterministic, rngs=None, frozen=None
):
  """Loss sums of a batch; language modelling never holds all logits.

  For language models the head runs over chunks of tokens in a scan: one
  chunk's logits [chunk, vocab] exist at a time, forward and backward,
  instead of [batch * length, vocab] (with a 128K vocabulary and 4K tokens,
  2 GiB of float32 per copy).

  `frozen`: when given, `variables` are the differentiated (trainable)
  variables and `frozen` the rest. The language-modelling head then takes
  the gradients of each chunk in the forward pass (`_fused_head_sums`): the
  logits are computed once, not recomputed in the backward pass, and no
  gradient is formed for a frozen head. Without it, the chunks are
  rematerialised in the backward pass.
  """
  if frozen is not None:
    params, variables = variables, qnn.merge_trees(variables, frozen)
  if task == CLASSIFICATION:
    return loss_sums(
      task, logits(model, variables, batch, deterministic, rngs), batch
    )
  hidden = model.apply(
    variables,
    batch["input_ids"],
    segment_ids=batch["segment_ids"],
    positions=batch["positions"],
    deterministic=deterministic,
    rngs=rngs,
    return_hidden=True,
  )
  mask = batch["loss_mask"].astype(jnp.float32)
  if "weights" in batch:
    mask = mask * batch["weights"][:, None]
  n = mask.size
  most = max(8, min(n, LM_CHUNK_ELEMENTS // model.config.vocab_size))
  chunk, chunks = lm_chunks(n, most)
  pad = chunks * chunk - n

  def flat(x, fill=0):
    x = x.reshape(n, *x.shape[2:])
    x = jnp.pad(x, [(0, pad)] + [(0, 0)] * (x.ndim - 1), constant_values=fill)
    return x.reshape(chunks, chunk, *x.shape[1:])

  xs = (flat(batch["targets"]), flat(mask))
  if frozen is None:
    sums = _rematerialised_head_sums(
      model, deterministic, variables, flat(hidden), *xs, rngs
    )
  else:
    head = _fused_head_sums(model, deterministic)
    sums = head(params, frozen, flat(hidden), *xs, rngs)
  return {"loss": sums[0], "weight": sums[1], "correct": sums[2]}


def _chunk_sums(model, deterministic, variables, h, t, m, rngs):
  """[loss sum, weight, right answers] of one chunk of hidden states."""
  out = model.apply(
    variables, None, hidden=h, deterministic=deterministic, rngs=rngs
  )
  ce = optax.softmax_cross_entropy_with_integer_labels(out, t)
  right = (jnp.argmax(out, -1) == t).astype(jnp.float32)
  return jnp.stack([jnp.sum(ce * m), jnp.sum(m), jnp.sum(right * m)])


def _rematerialised_head_sums(model, deterministic, variables, h, t, m, rngs):
  @jax.checkpoint
  def one(carry, xs):
    return carry + _chunk_sums(model, deterministic, variables, *xs, rngs), None

  sums, _ = jax.lax.scan(one, jnp.zeros(3, jnp.float32), (h, t, m))
  return sums


def _fused_head_sums(model, deterministic):
  """(params, frozen, h, t, m, rngs) -> sums, differentiable in params and
  h [chunks, chunk, hidden]: the forward pass of the VJP takes each chunk's
  gradients of the loss sum as it goes (a [chunk, vocab] cotangent at a
  time), keeping d(loss)/d(params) summed and d(loss)/d(h); the backward
  pass only scales them. The other sums have zero derivatives."""

  def primal(params, frozen, h, t, m, rngs):
    v = qnn.merge_trees(params, frozen)
    return _rematerialised_head_sums(model, deterministic, v, h, t, m, rngs)

  def fwd(params, frozen, h, t, m, rngs):
    seed = jnp.asarray([1.0, 0.0, 0.0], jnp.float32)

    def one(carry, xs):
      sums, d_params = carry
      hc, tc, mc = xs

      def f(p, hh):
        v = qnn.merge_trees(p, frozen)
        return _chunk_sums(model, deterministic, v, hh, tc, mc, rngs)

      s, vjp = jax.vjp(f, params, hc)
      dp, dh = vjp(seed)
      d_params = jax.tree.map(jnp.add, d_params, dp)
      return (sums + s, d_params), dh

    zeros = jax.tree.map(jnp.zeros_like, params)
    init = (jnp.zeros(3, jnp.float32), zeros)
    (sums, d_params), d_h = jax.lax.scan(one, init, (h, t, m))
    return sums, (d_params, d_h)

  def bwd(res, g):
    d_params, d_h = res
    scale = g[0]
    d_params = jax.tree.map(lambda d: (d * scale).astype(d.dtype), d_params)
    return d_params, None, (d_h * scale).astype(d_h.dtype), None, None, None

  fn = jax.custom_vjp(primal)
  fn.defvjp(fwd, bwd)
  return fn


def summarize(task: str, sums: dict[str, float]) -> dict[str, float]:
  """Mean loss, accuracy (token accuracy for LM) and perplexity (LM)."""
  weight = max(float(sums["weight"]), 1e-9)
  loss = float(sums["loss"]) / weight
  out = {"loss": loss, "accuracy": float(sums["correct"]) / weight}
  if task == CAUSAL_LM:
    out["perplexity"] = float(np.exp(min(loss, 80.0)))
  return out


def tokens_in(batch) -> int:
  """Real (non-padding) tokens of a host batch."""
  return int(np.count_nonzero(np.asarray(batch["segment_ids"])))


def token_logps(
  model, variables, rows, deterministic: bool, rngs=None, temperature=1.0
):
  """Per-token log p(target) [R, L] of [R, L] LM fields `rows`, of the
  logits divided by `temperature`, zero off the loss tokens. The head runs
  over chunks of tokens (one [chunk, vocab] of logits at a time,
  recomputed in the backward pass), as the language-modelling loss does."""
  shape = rows["input_ids"].shape
  hidden = model.apply(
    variables,
    rows["input_ids"],
    segment_ids=rows["segment_ids"],
    positions=rows["positions"],
    deterministic=deterministic,
    rngs=rngs,
    return_hidden=True,
  )
  mask = rows["loss_mask"].astype(jnp.float32)
  n = mask.size
  most = max(8, min(n, LM_CHUNK_ELEMENTS // model.config.vocab_size))
  chunk, chunks = lm_chunks(n, most)
  pad = chunks * chunk - n

  def flat(x):
    x = x.reshape(n, *x.shape[2:])
    x = jnp.pad(x, [(0, pad)] + [(0, 0)] * (x.ndim - 1))
    return x.reshape(chunks, chunk, *x.shape[1:])

  @jax.checkpoint
  def one(_, xs):
    h, t, m = xs
    out = model.apply(
      variables, None, hidden=h, deterministic=deterministic, rngs=rngs
    )
    if temperature != 1.0:
      out = out / temperature
    return None, -optax.softmax_cross_entropy_with_integer_labels(out, t) * m

  _, token = jax.lax.scan(
    one, None, (flat(hidden), flat(rows["targets"]), flat(mask))
  )
  return token.reshape(-1)[:n].reshape(shape)
