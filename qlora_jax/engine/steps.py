"""The pure train and eval steps, and the state they carry.

`train_step` is a module-level function of (state, batch, frozen): the
trainable tree and optimizer state live in `state`, the frozen base is an
argument that is never differentiated, and dropout is keyed by the step.
Gradient accumulation runs the micro-batches in a `lax.scan`; losses are
summed and divided by the total weight, so the update equals that of one
big batch.
"""

import functools
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax

from qlora_jax import nn as qnn
from qlora_jax.engine import losses


@flax.struct.dataclass
class TrainState:
  step: jax.Array  # int32 scalar: optimizer steps taken
  params: Any  # the trainable tree
  opt_state: Any
  rng: jax.Array  # uint32[2] raw PRNG key data, so orbax can save it


def create_state(params, tx: optax.GradientTransformation, seed: int):
  return TrainState(
    step=jnp.zeros((), jnp.int32),
    params=params,
    opt_state=tx.init(params),
    rng=jax.random.key_data(jax.random.key(seed)),
  )


def _micro_batches(batch: dict, accum: int) -> dict:
  """[B, ...] -> [accum, B / accum, ...]; micro-batch m takes rows m,
  m + accum, ... so that each device's rows stay on the device."""

  def split(x):
    x = x.reshape(x.shape[0] // accum, accum, *x.shape[1:])
    return jnp.swapaxes(x, 0, 1)

  return jax.tree.map(split, batch)


def train_step(
  state: TrainState,
  batch: dict,
  frozen: Any,
  *,
  model,
  task: str,
  tx: optax.GradientTransformation,
  accum: int = 1,
):
  """One optimizer step. Returns (new state, metric sums and norms)."""
  key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)

  def grads_of(params, micro, index):
    rngs = {"dropout": jax.random.fold_in(key, index)}

    def loss_fn(p):
      sums = losses.batch_sums(
        task, model, p, micro, False, rngs, frozen=frozen
      )
      return sums["loss"], sums

    return jax.grad(loss_fn, has_aux=True)(params)

  if accum == 1:
    grads, sums = grads_of(state.params, batch, 0)
  else:
    micro = _micro_batches(batch, accum)
    zero_g = jax.tree.map(jnp.zeros_like, state.params)
    zero_s = {
      k: jnp.zeros((), jnp.float32) for k in ("loss", "weight", "correct")
    }

    def body(carry, xs):
      g_acc, s_acc = carry
      mb, index = xs
      g, s = grads_of(state.params, mb, index)
      g_acc = jax.tree.map(jnp.add, g_acc, g)
      s_acc = {k: s_acc[k] + s[k] for k in s_acc}
      return (g_acc, s_acc), None

    (grads, sums), _ = jax.lax.scan(
      body, (zero_g, zero_s), (micro, jnp.arange(accum))
    )
  weight = jnp.maximum(sums["weight"], 1.0)
  grads = jax.tree.map(lambda g: g / weight, grads)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  metrics = dict(sums)
  metrics["grad_norm"] = optax.global_norm(grads)
  metrics["update_norm"] = optax.global_norm(updates)
  metrics["params_finite"] = jnp.all(
    jnp.asarray([jnp.all(jnp.isfinite(p)) for p in jax.tree.leaves(params)])
  )
  new_state = state.replace(
    step=state.step + 1, params=params, opt_state=opt_state
  )
  return new_state, metrics


def eval_step(params, batch: dict, frozen: Any, *, model, task: str):
  """Metric sums of one eval batch and the per-row predictions."""
  variables = qnn.merge_trees(params, frozen)
  if task != losses.CLASSIFICATION:
    return losses.batch_sums(task, model, variables, batch, True), {}
  out = losses.logits(model, variables, batch, True)
  probs = jax.nn.softmax(out, axis=-1)
  return losses.loss_sums(task, out, batch), {
    "predicted": jnp.argmax(out, -1),
    "probability": jnp.max(probs, -1),
  }


def jit_train_step(model, task, tx, accum, state_sh, batch_sh, frozen_sh):
  fn = functools.partial(train_step, model=model, task=task, tx=tx, accum=accum)
  return jax.jit(
    fn,
    in_shardings=(state_sh, batch_sh, frozen_sh),
    out_shardings=(state_sh, None),
    donate_argnums=(0,),
  )


def jit_eval_step(model, task, params_sh, batch_sh, frozen_sh):
  fn = functools.partial(eval_step, model=model, task=task)
  return jax.jit(fn, in_shardings=(params_sh, batch_sh, frozen_sh))
