"""Compiled memory and step time of the engine's train step over a stack of
linear layers (experiments.bench_layers).

The model follows the calling convention of the library's models (token
ids in, class logits out), so the step measured is the engine's own
`steps.jit_train_step` with its sharding, donation, loss and AdamW: a
frozen random embedding of a small vocabulary, `layers` QLoRA linear
layers of dim x dim with a GELU after each, a mean over tokens and a
frozen linear head to `LABELS` classes.
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from qlora_jax import nn as qnn
from qlora_jax.engine import profiling, recipes, sharding, steps
from qlora_jax.engine.settings import CLASSIFICATION

VOCAB = 64
LABELS = 8


class _Block(nn.Module):
  dim: int
  plan: qnn.Plan
  base_dtype: Any

  @nn.compact
  def __call__(self, x, deterministic):
    y = qnn.QLoRADense(
      self.dim,
      plan=self.plan,
      dtype=jnp.float32,
      base_dtype=self.base_dtype,
      name="dense",
    )(x, deterministic)
    return jax.nn.gelu(y), None


class LayerStack(nn.Module):
  """ids [B, L] -> class logits [B, LABELS] through `layers` linear layers."""

  dim: int
  layers: int
  plan: qnn.Plan = qnn.Plan()
  base_dtype: Any = jnp.float32
  scan: bool = True

  @nn.compact
  def __call__(
    self, input_ids, segment_ids=None, positions=None, deterministic=True
  ):
    del segment_ids, positions
    table = qnn.base_param(
      self, "embedding", nn.initializers.normal(1.0), (VOCAB, self.dim)
    )
    x = jnp.take(table, input_ids, axis=0).astype(jnp.float32)
    if self.scan:
      stack = nn.scan(
        _Block,
        variable_axes={qnn.BASE: 0, qnn.PARAMS: 0},
        split_rngs={"params": True, "dropout": True},
        in_axes=nn.broadcast,
        length=self.layers,
      )
      x, _ = stack(self.dim, self.plan, self.base_dtype, name="layers")(
        x, deterministic
      )
    else:
      for i in range(self.layers):
        x, _ = _Block(self.dim, self.plan, self.base_dtype, name=f"layers_{i}")(
          x, deterministic
        )
    head = qnn.base_param(
      self, "head", nn.initializers.normal(0.02), (self.dim, LABELS)
    )
    return jnp.mean(x, axis=1) @ head


def linear_paths(scan: bool, layers: int) -> list[str]:
  if scan:
    return ["layers/dense"]
  return [f"layers_{i}/dense" for i in range(layers)]


def mode_inputs(mode: str, rank: int):
  """(lora, quant, base dtype, train patterns) of a training mode."""
  lora, quant, base_dtype, patterns = recipes.plan_inputs(mode, rank)
  return lora, quant, jnp.dtype(base_dtype), patterns


def run_variant(
  mode: str,
  batch: int,
  seq: int,
  *,
  layers: int,
  dim: int,
  rank: int,
  scan: bool = True,
  repeats: int = 5,
) -> dict[str, Any]:
  """Compiled memory, trainable parameters and median step time of one
  training mode at one batch shape."""
  lora, quant_cfg, base_dtype, patterns = mode_inputs(mode, rank)
  plan = qnn.make_plan(linear_paths(scan, layers), lora, quant_cfg)
  model = LayerStack(dim, layers, plan, base_dtype, scan)
  ids = jax.random.randint(jax.random.key(1), (batch, seq), 0, VOCAB)
  batch_arrays = {
    "input_ids": ids,
    "segment_ids": jnp.ones((batch, seq), jnp.int32),
    "positions": jnp.tile(jnp.arange(seq), (batch, 1)),
    "labels": jnp.arange(batch, dtype=jnp.int32) % LABELS,
  }
  variables = jax.jit(model.init)(jax.random.key(0), ids)
  trainable, frozen = qnn.split_trainable(variables, train_patterns=patterns)
  tx = optax.adamw(1e-4)
  state = steps.create_state(trainable, tx, 0)
  mesh = sharding.make_mesh(1, 1, jax.devices()[:1])
  state_sh = sharding.tree_shardings(mesh, state)
  frozen_sh = sharding.tree_shardings(mesh, frozen)
  step = steps.jit_train_step(
    model,
    CLASSIFICATION,
    tx,
    1,
    state_sh,
    sharding.batch_sharding(mesh),
    frozen_sh,
  )
  compiled = step.lower(state, batch_arrays, frozen).compile()
  memory = profiling.compiled_memory(compiled)
  box = {"state": state}

  def one():
    box["state"], metrics = compiled(box["state"], batch_arrays, frozen)
    return metrics["loss"]

  seconds = profiling.median_seconds(one, warmup=1, repeats=repeats)
  n_train = qnn.num_params(trainable)
  # What QLoRA must hold at least: packed base, adapters, their gradients
  # and two Adam moments, the input and one activation per layer.
  activations = (layers + 1) * batch * seq * dim * 4
  ideal = qnn.num_bytes(frozen) + 4 * n_train * 4 + activations
  return {
    "variant": mode,
    "tokens": f"{batch}x{seq}",
    "memory_mib": memory["total"] / 2**20,
    "temp_mib": memory["temporaries"] / 2**20,
    "trainable": n_train,
    "step_s": seconds,
    "ideal_mib": ideal / 2**20,
    "finite": bool(np.isfinite(float(one()))),
  }
