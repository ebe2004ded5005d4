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

CLASSIFICATION = "classification"
CAUSAL_LM = "causal_lm"
TASKS = (CLASSIFICATION, CAUSAL_LM)


def check_task(task: str) -> str:
  if task not in TASKS:
    raise ValueError(f"model.task: unknown task {task!r}, expected {TASKS}")
  return task


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


# Logits elements per chunk of the language-modelling loss (16 MiB of f32).
LM_CHUNK_ELEMENTS = 1 << 22


def batch_sums(task, model, variables, batch, deterministic, rngs=None):
  """Loss sums of a batch; language modelling never holds all logits.

  For language models the head runs over chunks of tokens in a remat'ed
  scan: one chunk's logits [chunk, vocab] exist at a time, forward and
  backward, instead of [batch * length, vocab] (with a 128K vocabulary and
  4K tokens, 2 GiB of float32 per copy).
  """
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
  chunk = max(8, min(n, LM_CHUNK_ELEMENTS // model.config.vocab_size))
  chunks = -(-n // chunk)
  pad = chunks * chunk - n

  def flat(x, fill=0):
    x = x.reshape(n, *x.shape[2:])
    x = jnp.pad(x, [(0, pad)] + [(0, 0)] * (x.ndim - 1), constant_values=fill)
    return x.reshape(chunks, chunk, *x.shape[1:])

  @jax.checkpoint
  def one(carry, xs):
    h, t, m = xs
    out = model.apply(
      variables, None, hidden=h, deterministic=deterministic, rngs=rngs
    )
    ce = optax.softmax_cross_entropy_with_integer_labels(out, t)
    right = (jnp.argmax(out, -1) == t).astype(jnp.float32)
    return carry + jnp.stack(
      [jnp.sum(ce * m), jnp.sum(m), jnp.sum(right * m)]
    ), None

  sums, _ = jax.lax.scan(
    one,
    jnp.zeros(3, jnp.float32),
    (flat(hidden), flat(batch["targets"]), flat(mask)),
  )
  return {"loss": sums[0], "weight": sums[1], "correct": sums[2]}


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
