"""The pure train and eval steps, and the state they carry.

`train_step` is a module-level function of (state, batch, frozen): the
trainable tree and optimizer state live in `state`, the frozen base is an
argument that is never differentiated, and dropout is keyed by the step.
Gradient accumulation runs the micro-batches in a `lax.scan`; losses are
summed and divided by the total weight, so the update equals that of one
big batch.
"""

import dataclasses
import functools
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax

from qlora_jax import data, models
from qlora_jax import nn as qnn
from qlora_jax.engine import losses
from qlora_jax.engine.settings import CAUSAL_LM


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
  objective=None,
):
  """One optimizer step. Returns (new state, metric sums and norms).

  `objective`: None for the task's own loss (SFT), or an object with
  `sums(model, params, frozen, batch, deterministic, rngs)` and
  `sum_keys` (`dpo.Dpo`, `grpo.Grpo`)."""
  key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)

  def grads_of(params, micro, index):
    rngs = {"dropout": jax.random.fold_in(key, index)}

    def loss_fn(p):
      if objective is not None:
        sums = objective.sums(model, p, frozen, micro, False, rngs)
        return sums["loss"], sums
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
    keys = objective.sum_keys if objective else ("loss", "weight", "correct")
    zero_s = {k: jnp.zeros((), jnp.float32) for k in keys}

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
  metrics["param_norm"] = optax.global_norm(state.params)  # before the update
  metrics["params_finite"] = jnp.all(
    jnp.asarray([jnp.all(jnp.isfinite(p)) for p in jax.tree.leaves(params)])
  )
  new_state = state.replace(
    step=state.step + 1, params=params, opt_state=opt_state
  )
  return new_state, metrics


def eval_step(
  params, batch: dict, frozen: Any, *, model, task: str, objective=None
):
  """Metric sums of one eval batch and the per-row predictions."""
  if objective is not None:
    return objective.sums(model, params, frozen, batch, True), {}
  variables = qnn.merge_trees(params, frozen)
  if task != losses.CLASSIFICATION:
    return losses.batch_sums(task, model, variables, batch, True), {}
  out = losses.logits(model, variables, batch, True)
  probs = jax.nn.softmax(out, axis=-1)
  return losses.loss_sums(task, out, batch), {
    "predicted": jnp.argmax(out, -1),
    "probability": jnp.max(probs, -1),
  }


def jit_train_step(
  model, task, tx, accum, state_sh, batch_sh, frozen_sh, objective=None
):
  fn = functools.partial(
    train_step, model=model, task=task, tx=tx, accum=accum, objective=objective
  )
  return jax.jit(
    fn,
    in_shardings=(state_sh, batch_sh, frozen_sh),
    out_shardings=(state_sh, None),
    donate_argnums=(0,),
  )


def jit_eval_step(model, task, params_sh, batch_sh, frozen_sh, objective=None):
  fn = functools.partial(eval_step, model=model, task=task, objective=objective)
  return jax.jit(fn, in_shardings=(params_sh, batch_sh, frozen_sh))


def batch_shapes(task: str, batch: int, seq: int, pairs: bool = False) -> dict:
  """Abstract arrays of one batch of `task` ([batch, seq] int32 fields,
  float32 `loss_mask`; a classifier's labels [batch]), named as
  `data.LM_FIELDS` / `data.CLASSIFICATION_FIELDS`. `pairs`: preference
  pairs (DPO), [batch, 2, seq] fields and `ref_logps` [batch, 2]."""
  fields = data.LM_FIELDS if task == CAUSAL_LM else data.CLASSIFICATION_FIELDS
  rows = (batch, 2, seq) if pairs else (batch, seq)
  out = {}
  for name in fields:
    if name == "labels":
      out[name] = jax.ShapeDtypeStruct((batch,), jnp.int32)
    elif name == "loss_mask":
      out[name] = jax.ShapeDtypeStruct(rows, jnp.float32)
    else:
      out[name] = jax.ShapeDtypeStruct(rows, jnp.int32)
  if pairs:
    out["ref_logps"] = jax.ShapeDtypeStruct((batch, 2), jnp.float32)
  return out


def random_lm_batch(rng: np.random.Generator, vocab: int, batch: int, seq: int):
  """A causal-LM batch of random tokens in [1, vocab) (benchmarks), with the
  fields and dtypes of `batch_shapes`."""
  ids = rng.integers(1, vocab, (batch, seq + 1), dtype=np.int32)
  out = {
    "input_ids": ids[:, :-1],
    "segment_ids": np.ones((batch, seq), np.int32),
    "positions": np.tile(np.arange(seq, dtype=np.int32), (batch, 1)),
    "targets": ids[:, 1:],
    "loss_mask": np.ones((batch, seq), np.float32),
  }
  return {name: jnp.asarray(out[name]) for name in data.LM_FIELDS}


@dataclasses.dataclass
class AbstractStep:
  """The train step of a model, jitted (the state donated), with abstract
  arguments: lower and compile it before any weight exists.

  Attributes:
    fn: `fn(state, batch, frozen) -> (state, metrics)`.
    state, batch, frozen: its arguments as `jax.ShapeDtypeStruct` trees.
    model: the built model.
    tx: the optimizer.
  """

  fn: Any
  state: Any
  batch: dict
  frozen: Any
  model: Any
  tx: optax.GradientTransformation

  @property
  def args(self) -> tuple:
    return self.state, self.batch, self.frozen

  def compile(self):
    return self.fn.lower(*self.args).compile()


def abstract_step(
  spec: models.ModelSpec,
  opts: models.Options,
  *,
  batch: int,
  seq: int,
  train_patterns=(),
  tx: optax.GradientTransformation | None = None,
  accum: int = 1,
  seed: int = 0,
  objective=None,
) -> AbstractStep:
  """The engine's train step over `spec` built with `opts`, from shapes
  alone: lowering for another platform, the memory model's tests and the
  benchmarks all compile this one (default optimizer: AdamW 1e-4;
  `objective` as `train_step` takes it: a DPO step's batch is `batch`
  pairs, a GRPO step's `batch` prompts of G completions)."""
  model = spec.build(opts)
  trainable, frozen = qnn.split_trainable(
    spec.abstract_variables(opts), train_patterns
  )
  tx = tx or optax.adamw(1e-4)
  state = jax.eval_shape(lambda t: create_state(t, tx, seed), trainable)
  fn = jax.jit(
    functools.partial(
      train_step,
      model=model,
      task=spec.task,
      tx=tx,
      accum=accum,
      objective=objective,
    ),
    donate_argnums=(0,),
  )
  if objective is not None:  # its own fields: pairs (DPO), groups (GRPO)
    shapes = objective.batch_shapes(batch, seq)
  else:
    shapes = batch_shapes(spec.task, batch, seq)
  return AbstractStep(fn, state, shapes, frozen, model, tx)
