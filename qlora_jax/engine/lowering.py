"""A run's whole training step lowered for a GPU or a TPU, from any machine.

`export_train_step` builds the engine's real train step (the same model,
optimizer, micro-batching and loss as `train`) from abstract shapes and
lowers it with `jax.export` for "cuda", "rocm" or "tpu". Nothing is
allocated, so a 7B step lowers on a laptop. With `model.matmul_kernel`
"auto" or "pallas" the fused 4-bit kernels are lowered for the target
(`pallas_matmul.lowering_for`): Triton kernels become `__gpu$xla.gpu.triton`
custom calls carrying Triton IR, Mosaic kernels `tpu_custom_call`s carrying
Mosaic MLIR.

What cannot be checked without the device: the Triton IR is compiled to
PTX, and the Mosaic MLIR to TPU code, only by that device's XLA backend
when the program is compiled there; so tile shapes that exceed a chip's
shared memory / VMEM, or a Triton version mismatch, surface only then.
Triton calls carry no serialization compatibility guarantee: they are
exported with that check disabled and are valid for the jax version that
made them.
"""

import dataclasses
import re

import jax
import jax.numpy as jnp
from jax import export

from qlora_jax import models
from qlora_jax import nn as qnn
from qlora_jax.engine import optim, setup, steps
from qlora_jax.engine.settings import Settings
from qlora_jax.nn import pallas_matmul

TRITON_CALL = "__gpu$xla.gpu.triton"
PLATFORMS = ("cuda", "rocm", "tpu")


@dataclasses.dataclass
class Lowered:
  platform: str
  exported: export.Exported
  custom_calls: dict[str, int]  # target name -> number of call sites

  @property
  def text(self) -> str:
    return self.exported.mlir_module()


def abstract_step(s: Settings, config, num_labels: int | None = None):
  """(the jitted train step, its abstract (state, batch, frozen))."""
  m = s.model
  spec = models.ModelSpec(config, m.task, num_labels)
  plan = models.model_plan(spec, s.lora_plan(), s.quant_plan(), m.scan_layers)
  opts = models.Options(
    plan,
    setup.DTYPES[m.dtype],
    setup.DTYPES[m.base_dtype],
    m.remat,
    m.scan_layers,
    m.matmul_kernel,
    setup.DTYPES.get(m.embed_dtype),
  )
  model = spec.build(opts)
  trainable, frozen = qnn.split_trainable(
    spec.abstract_variables(opts), s.train_patterns()
  )
  tx, _ = optim.make_optimizer(s.opt, 1000)
  state = jax.eval_shape(
    lambda t: steps.create_state(t, tx, s.train.seed), trainable
  )
  b, t = s.train.batch_size, s.data.max_length
  i32 = jax.ShapeDtypeStruct((b, t), jnp.int32)
  batch = {"input_ids": i32, "segment_ids": i32, "positions": i32}
  if m.task == "causal_lm":
    batch["targets"] = i32
    batch["loss_mask"] = jax.ShapeDtypeStruct((b, t), jnp.float32)
  else:
    batch["labels"] = jax.ShapeDtypeStruct((b,), jnp.int32)

  def step(state, batch, frozen):
    return steps.train_step(
      state,
      batch,
      frozen,
      model=model,
      task=m.task,
      tx=tx,
      accum=s.train.grad_accum,
    )

  return jax.jit(step, donate_argnums=(0,)), (state, batch, frozen)


def custom_calls(text: str) -> dict[str, int]:
  """{custom call target: call sites} in a StableHLO module's text."""
  out: dict[str, int] = {}
  for name in re.findall(r"stablehlo\.custom_call @([\w$.\-]+)", text):
    out[name] = out.get(name, 0) + 1
  return out


def export_train_step(
  s: Settings, config, platform: str, num_labels: int | None = None
) -> Lowered:
  """The run's train step exported for `platform` (see the module doc).

  Raises:
    ValueError: an unknown platform.
  """
  if platform not in PLATFORMS:
    raise ValueError(f"platform {platform!r}: expected one of {PLATFORMS}")
  fn, args = abstract_step(s, config, num_labels)
  checks = [export.DisabledSafetyCheck.custom_call(TRITON_CALL)]
  with pallas_matmul.lowering_for(platform):
    exported = export.export(fn, platforms=[platform], disabled_checks=checks)(
      *args
    )
  return Lowered(platform, exported, custom_calls(exported.mlir_module()))
