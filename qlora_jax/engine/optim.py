"""The optimizer over the trainable tree: AdamW, schedules, clipping, LoRA+."""

from typing import Any

import jax
import optax

from qlora_jax.engine.settings import SCHEDULES, OptSettings


def schedule(
  name: str, learning_rate: float, total_steps: int, warmup_steps: int
) -> optax.Schedule:
  """Linear warmup to `learning_rate`, then constant / linear / cosine decay
  to zero at `total_steps`."""
  if name not in SCHEDULES:
    raise ValueError(
      f"opt.schedule: unknown schedule {name!r}, expected one of {SCHEDULES}"
    )
  if learning_rate <= 0:
    raise ValueError(f"opt.learning_rate must be > 0, got {learning_rate}")
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
  if ratio <= 0:
    raise ValueError(f"opt.lora_plus_ratio must be > 0, got {ratio}")
  if ratio == 1.0:
    core = adamw(lr)
  else:
    core = optax.multi_transform(
      {"rest": adamw(lr), "lora_b": adamw(lambda s: ratio * lr(s))},
      _labels,
    )
  if opt.max_grad_norm < 0:
    raise ValueError(f"opt.max_grad_norm must be >= 0, got {opt.max_grad_norm}")
  if opt.max_grad_norm > 0:
    return optax.chain(optax.clip_by_global_norm(opt.max_grad_norm), core), lr
  return optax.chain(core), lr
