"""The optimizer over the trainable tree: AdamW, schedules, clipping, LoRA+."""

import dataclasses
from typing import Any

import jax
import optax

from qlora_jax.quant import SpecError

SCHEDULES = ("constant", "linear", "cosine")


@dataclasses.dataclass(frozen=True)
class OptSettings:
  """The optimizer's settings (the config's `opt` section); the one owner
  of their rules (`SpecError` names the field)."""

  learning_rate: float
  schedule: str
  warmup_ratio: float
  warmup_steps: int
  weight_decay: float
  b1: float
  b2: float
  eps: float
  max_grad_norm: float
  lora_plus_ratio: float

  def __post_init__(self):
    if self.learning_rate <= 0:
      raise SpecError("learning_rate", f"must be > 0, got {self.learning_rate}")
    if self.schedule not in SCHEDULES:
      raise SpecError(
        "schedule",
        f"unknown value {self.schedule!r}, expected one of {SCHEDULES}",
      )
    if not 0.0 <= self.warmup_ratio <= 1.0:
      raise SpecError(
        "warmup_ratio", f"must be in [0, 1], got {self.warmup_ratio}"
      )
    if self.warmup_steps < 0:
      raise SpecError("warmup_steps", f"must be >= 0, got {self.warmup_steps}")
    if self.weight_decay < 0:
      raise SpecError("weight_decay", f"must be >= 0, got {self.weight_decay}")
    for field in ("b1", "b2"):
      if not 0.0 <= getattr(self, field) < 1.0:
        raise SpecError(field, f"must be in [0, 1), got {getattr(self, field)}")
    if self.eps <= 0:
      raise SpecError("eps", f"must be > 0, got {self.eps}")
    if self.max_grad_norm < 0:
      raise SpecError(
        "max_grad_norm", f"must be >= 0, got {self.max_grad_norm}"
      )
    if self.lora_plus_ratio <= 0:
      raise SpecError(
        "lora_plus_ratio", f"must be > 0, got {self.lora_plus_ratio}"
      )


def schedule(
  name: str, learning_rate: float, total_steps: int, warmup_steps: int
) -> optax.Schedule:
  """Linear warmup to `learning_rate`, then constant / linear / cosine decay
  to zero at `total_steps`."""
  if name not in SCHEDULES:
    raise ValueError(f"unknown schedule {name!r}, expected one of {SCHEDULES}")
  warmup_steps = max(0, min(int(warmup_steps), total_steps))
  decay_steps = max(1, total_steps - warmup_steps)
  if name == "constant":
    after = optax.constant_schedule(learning_rate)
  elif name == "linear":
    after = optax.linear_schedule(learning_rate, 0.0, decay_steps)
  else:
    after = optax.cosine_decay_schedule(learning_rate, decay_steps)
  if not warmup_steps:
    return after
  warm = optax.linear_schedule(0.0, learning_rate, warmup_steps)
  return optax.join_schedules([warm, after], [warmup_steps])


def warmup_steps(opt: OptSettings, total_steps: int) -> int:
  """`opt.warmup_steps` when > 0, else `opt.warmup_ratio` of the steps."""
  if opt.warmup_steps:
    return opt.warmup_steps
  return int(round(opt.warmup_ratio * total_steps))


def _labels(trainable) -> Any:
  """ "lora_b" for LoRA B matrices (LoRA+), "rest" for everything else."""

  def label(path, _):
    last = getattr(path[-1], "key", None)
    return "lora_b" if last == "lora_b" else "rest"

  return jax.tree_util.tree_map_with_path(label, trainable)


def make_optimizer(
  opt: OptSettings, total_steps: int
) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """AdamW with clipping and a schedule; LoRA+ when `lora_plus_ratio` != 1.

  `max_grad_norm` 0 turns clipping off; `lora_plus_ratio` is B's learning
  rate over A's. Returns (the transformation, the base learning-rate
  schedule for logging).
  """
  lr = schedule(
    opt.schedule, opt.learning_rate, total_steps, warmup_steps(opt, total_steps)
  )

  def adamw(rate):
    return optax.adamw(
      rate, b1=opt.b1, b2=opt.b2, eps=opt.eps, weight_decay=opt.weight_decay
    )

  ratio = opt.lora_plus_ratio
  if ratio == 1.0:
    core = adamw(lr)
  else:
    core = optax.multi_transform(
      {"rest": adamw(lr), "lora_b": adamw(lambda s: ratio * lr(s))},
      _labels,
    )
  if opt.max_grad_norm > 0:
    return optax.chain(optax.clip_by_global_norm(opt.max_grad_norm), core), lr
  return optax.chain(core), lr
