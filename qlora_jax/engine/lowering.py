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

from jax import export

from qlora_jax import models
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


def abstract_step(
  s: Settings, config, num_labels: int | None = None
) -> steps.AbstractStep:
  """The run's train step (`steps.abstract_step`) from abstract shapes."""
  spec = models.ModelSpec(config, s.model.task, num_labels)
  tx, _ = optim.make_optimizer(s.opt, 1000)
  return steps.abstract_step(
    spec,
    setup.layer_options(s, spec),
    batch=s.train.batch_size,
    seq=s.data.max_length,
    train_patterns=s.train_patterns(),
    tx=tx,
    accum=s.train.grad_accum,
    seed=s.train.seed,
  )


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
  step = abstract_step(s, config, num_labels)
  checks = [export.DisabledSafetyCheck.custom_call(TRITON_CALL)]
  with pallas_matmul.lowering_for(platform):
    exported = export.export(
      step.fn, platforms=[platform], disabled_checks=checks
    )(*step.args)
  return Lowered(platform, exported, custom_calls(exported.mlir_module()))
