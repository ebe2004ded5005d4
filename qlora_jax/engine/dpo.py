"""Direct preference optimization over adapters (`train.objective: dpo`).

The policy is the model with its adapters; the reference is the same
model with its adapters off (`adapters_off`: every layer's adapter
removed from the plan, so the adapter branch is not computed at all and
the program is the base model's own). Adapters start at zero (B = 0), so
the reference is the starting policy, and no second copy of the model is
held.

The reference log-probs are computed once, before training, for every
train and eval pair (`with_reference`), and travel with the data as
`ref_logps` [N, 2]: the reference never changes, so recomputing it at
each step would add a forward pass per pair per epoch (a third of a
step's work) and its activations to the step; computed once it costs one
forward pass per pair, and a resumed run recomputes the same values bit
for bit (same program, same inputs). The losses are `dpo_loss`'s.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from qlora_jax import nn as qnn
from qlora_jax.engine import losses, steps
from qlora_jax.engine.dpo_loss import DpoSettings, pair_terms
from qlora_jax.engine.settings import CAUSAL_LM

REFERENCE = "ref_logps"  # the batch field of the reference log-probs [B, 2]
PAIR_FIELDS = ("input_ids", "segment_ids", "positions", "targets", "loss_mask")


@dataclasses.dataclass(frozen=True)
class Dpo:
  """The objective `steps.train_step` takes for DPO."""

  settings: DpoSettings
  sum_keys = (
    "loss",
    "weight",
    "correct",
    "chosen_reward",
    "rejected_reward",
    "margin",
  )

  def sums(self, model, params, frozen, batch, deterministic, rngs=None):
    """`sum_keys` sums over the batch's pairs (rows weighted by
    `weights` in evaluation), differentiable in `params`."""
    variables = qnn.merge_trees(params, frozen)
    logps, tokens = pair_logps(model, variables, batch, deterministic, rngs)
    loss, chosen, rejected = pair_terms(
      logps, batch[REFERENCE], tokens, self.settings
    )
    w = batch.get("weights", jnp.ones(loss.shape, jnp.float32))
    return {
      "loss": jnp.sum(loss * w),
      "weight": jnp.sum(w),
      "correct": jnp.sum((chosen > rejected).astype(jnp.float32) * w),
      "chosen_reward": jnp.sum(chosen * w),
      "rejected_reward": jnp.sum(rejected * w),
      "margin": jnp.sum((chosen - rejected) * w),
    }

  def batch_shapes(self, pairs: int, seq: int) -> dict:
    """Abstract arrays of a step's batch of `pairs` pairs."""
    return steps.batch_shapes(CAUSAL_LM, pairs, seq, pairs=True)

  def summarize(self, sums: dict[str, float]) -> dict[str, float]:
    """Means per pair: loss, reward accuracy (as "accuracy"), rewards and
    margin."""
    weight = max(float(sums["weight"]), 1e-9)
    out = {k: float(sums[k]) / weight for k in self.sum_keys if k != "weight"}
    out["accuracy"] = out.pop("correct")
    return out


def pair_logps(model, variables, batch, deterministic, rngs=None):
  """(log-probs, answer tokens), both [B, 2]: each answer's summed
  log p(target) over its loss tokens, from [B, 2, L] fields
  (`losses.token_logps` over the 2B rows)."""
  pairs, length = batch["input_ids"].shape[:2], batch["input_ids"].shape[-1]
  rows = {k: batch[k].reshape(-1, length) for k in PAIR_FIELDS}
  token = losses.token_logps(model, variables, rows, deterministic, rngs)
  token = token.reshape(*pairs, length)
  mask = batch["loss_mask"].astype(jnp.float32)
  return token.sum(-1), mask.sum(-1)


def adapters_off(model):
  """`model` with no adapter in its plan: the frozen base alone, reading
  the same variables (the adapters' are left unread)."""
  plan = model.opts.plan
  layers = tuple(
    (path, dataclasses.replace(spec, lora=None)) for path, spec in plan.layers
  )
  opts = dataclasses.replace(
    model.opts, plan=dataclasses.replace(plan, layers=layers)
  )
  return model.clone(opts=opts, parent=None)


def reference_logps(model, variables, arrays, batch_size: int, mesh):
  """Log-probs [N, 2] of every pair of `arrays` under `model` with its
  adapters off, in batches of `batch_size` pairs (the last one padded),
  replicated on `mesh` so that every process computes every row."""
  off = adapters_off(model)
  fn = jax.jit(lambda v, b: pair_logps(off, v, b, True)[0])
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  n = len(arrays["input_ids"])
  out = []
  for start in range(0, n, batch_size):
    idx = np.minimum(np.arange(start, start + batch_size), n - 1)
    batch = {
      k: jax.make_array_from_process_local_data(replicated, arrays[k][idx])
      for k in PAIR_FIELDS
    }
    out.append(np.asarray(jax.device_get(fn(variables, batch))))
  return np.concatenate(out)[:n].astype(np.float32)


def with_reference(arrays, model, variables, batch_size: int, mesh) -> dict:
  """`arrays` with their reference log-probs added (`REFERENCE`)."""
  ref = reference_logps(model, variables, arrays, batch_size, mesh)
  return dict(arrays, **{REFERENCE: ref})


def with_reference_data(run_data, model, trainable, frozen, batch_size, mesh):
  """A run's data (`setup.RunData`) with the reference log-probs of its
  train and eval pairs, from the model with adapters off."""
  variables = qnn.merge_trees(trainable, frozen)
  return dataclasses.replace(
    run_data,
    train=with_reference(run_data.train, model, variables, batch_size, mesh),
    eval=with_reference(run_data.eval, model, variables, batch_size, mesh),
  )
