"""Compiled memory and step time of a train step over a stack of layers.

python -m experiments.bench_layers [--layers 8 --dim 4096 --rank 16]

One train step (forward, backward, AdamW on the trainable tree) over a stack
of `layers` linear layers of dim x dim, for: full fine-tune f32, LoRA over a
frozen f32 base, LoRA over a frozen bf16 base, QLoRA nf4 + double quant.
Reports XLA's compiled memory (arguments + temporaries + outputs - aliased),
trainable parameters and the median step time, at 1x128 and 4x512 tokens,
and the QLoRA ratios against the better LoRA baseline. Last line: JSON.
"""

import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from absl import app, flags, logging

from qlora_jax import nn as qnn
from qlora_jax import profiling

_LAYERS = flags.DEFINE_integer("layers", 8, "Layers in the stack.")
_DIM = flags.DEFINE_integer("dim", 4096, "Width of every layer.")
_RANK = flags.DEFINE_integer("rank", 16, "LoRA rank.")
_SCAN = flags.DEFINE_bool("scan", True, "nn.scan over the layers.")
_TOKENS = flags.DEFINE_list("tokens", ["1x128", "4x512"], "Batch shapes.")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed steps per variant.")

VARIANTS = {
  # name: (lora, quant, base dtype, train the base)
  "full_f32": (None, None, jnp.float32, True),
  "lora_f32": ({"rank": None}, None, jnp.float32, False),
  "lora_bf16": ({"rank": None}, None, jnp.bfloat16, False),
  "qlora_nf4_dq": (
    {"rank": None},
    {"data_type": "nf4", "block_size": 64, "double_quant": True},
    jnp.float32,
    False,
  ),
}


class Block(nn.Module):
  dim: int
  plan: qnn.Plan
  base_dtype: jnp.dtype

  @nn.compact
  def __call__(self, x, _=None):
    y = qnn.QLoRADense(
      self.dim,
      plan=self.plan,
      dtype=jnp.float32,
      base_dtype=self.base_dtype,
      name="dense",
    )(x)
    return jax.nn.gelu(y), None


class LayerStack(nn.Module):
  dim: int
  layers: int
  plan: qnn.Plan = qnn.Plan()
  base_dtype: jnp.dtype = jnp.float32
  scan: bool = True

  @nn.compact
  def __call__(self, x):
    if self.scan:
      stack = nn.scan(
        Block,
        variable_axes={qnn.BASE: 0, qnn.PARAMS: 0},
        split_rngs={"params": True},
        length=self.layers,
      )
      x, _ = stack(self.dim, self.plan, self.base_dtype, name="layers")(x)
      return x
    for i in range(self.layers):
      x, _ = Block(self.dim, self.plan, self.base_dtype, name=f"layers_{i}")(x)
    return x


def _linear_paths(scan: bool, layers: int) -> list[str]:
  if scan:
    return ["layers/dense"]
  return [f"layers_{i}/dense" for i in range(layers)]


def _train_step(model, opt):
  def step(trainable, opt_state, frozen, x):
    def loss_fn(t):
      y = model.apply(qnn.merge_trees(t, frozen), x)
      return jnp.mean(jnp.square(y))

    loss, grads = jax.value_and_grad(loss_fn)(trainable)
    updates, opt_state = opt.update(grads, opt_state, trainable)
    return optax.apply_updates(trainable, updates), opt_state, loss

  return jax.jit(step, donate_argnums=(0, 1))


def run_variant(name: str, batch: int, seq: int) -> dict:
  lora, quant_cfg, base_dtype, train_base = VARIANTS[name]
  if lora is not None:
    lora = {"rank": _RANK.value, "alpha": 2.0 * _RANK.value}
  paths = _linear_paths(_SCAN.value, _LAYERS.value)
  plan = qnn.make_plan(paths, lora, quant_cfg)
  model = LayerStack(_DIM.value, _LAYERS.value, plan, base_dtype, _SCAN.value)
  x = jax.random.normal(jax.random.key(1), (batch * seq, _DIM.value))
  variables = jax.jit(model.init)(jax.random.key(0), x)
  trainable, frozen = qnn.split_trainable(
    variables, train_patterns=[".*"] if train_base else []
  )
  opt = optax.adamw(1e-4)
  opt_state = opt.init(trainable)
  step = _train_step(model, opt)
  compiled = step.lower(trainable, opt_state, frozen, x).compile()
  memory = profiling.compiled_memory(compiled)
  state = {"t": trainable, "o": opt_state}

  def one():
    state["t"], state["o"], loss = compiled(state["t"], state["o"], frozen, x)
    return loss

  seconds = profiling.median_seconds(one, warmup=1, repeats=_REPEATS.value)
  n_train = qnn.num_params(trainable)
  # What QLoRA must hold at least: packed base, adapters, their gradients
  # and two Adam moments, the input and one activation per layer.
  activations = (_LAYERS.value + 1) * x.size * 4
  ideal = qnn.num_bytes(frozen) + 4 * n_train * 4 + activations
  return {
    "variant": name,
    "tokens": f"{batch}x{seq}",
    "memory_mib": memory["total"] / 2**20,
    "temp_mib": memory["temporaries"] / 2**20,
    "trainable": n_train,
    "step_s": seconds,
    "ideal_mib": ideal / 2**20,
  }


def main(argv):
  del argv
  logging.info("devices: %s", jax.devices())
  results = []
  for shape in _TOKENS.value:
    batch, seq = (int(v) for v in shape.split("x"))
    for name in VARIANTS:
      r = run_variant(name, batch, seq)
      results.append(r)
      print(
        f"{r['tokens']:>6} {name:<13} memory {r['memory_mib']:8.1f} MiB "
        f"(temp {r['temp_mib']:7.1f})  trainable {r['trainable']:>11,}  "
        f"step {r['step_s'] * 1e3:8.1f} ms",
        flush=True,
      )
  summary = {"scan": _SCAN.value, "layers": _LAYERS.value, "dim": _DIM.value}
  for shape in _TOKENS.value:
    by = {r["variant"]: r for r in results if r["tokens"] == shape}
    q = by["qlora_nf4_dq"]
    mem_base = min(by["lora_f32"]["memory_mib"], by["lora_bf16"]["memory_mib"])
    time_base = min(by["lora_f32"]["step_s"], by["lora_bf16"]["step_s"])
    mem_ratio = q["memory_mib"] / mem_base
    time_ratio = q["step_s"] / time_base
    print(
      f"{shape}: QLoRA memory {q['memory_mib']:.1f} MiB = {mem_ratio:.3f}x "
      f"the better LoRA ({mem_base:.1f} MiB; ideal {q['ideal_mib']:.1f} MiB), "
      f"step {time_ratio:.3f}x the faster LoRA"
    )
    key = shape.replace("x", "x")
    summary[f"qlora_memory_ratio_{key}"] = round(mem_ratio, 4)
    summary[f"qlora_time_ratio_{key}"] = round(time_ratio, 4)
    summary[f"qlora_ideal_mib_{key}"] = round(q["ideal_mib"], 1)
    for r in by.values():
      summary[f"{r['variant']}_{key}_mib"] = round(r["memory_mib"], 1)
      summary[f"{r['variant']}_{key}_ms"] = round(r["step_s"] * 1e3, 1)
  first = _TOKENS.value[0]
  summary["qlora_memory_ratio"] = summary[f"qlora_memory_ratio_{first}"]
  summary["qlora_time_ratio"] = summary[f"qlora_time_ratio_{first}"]
  print(json.dumps(summary))


if __name__ == "__main__":
  app.run(main)
