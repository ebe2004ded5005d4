"""The optimizer over the trainable tree: AdamW, schedules, clipping, LoRA+."""

from collections.abc import Mapping
from typing import Any

import jax
import optax

SCHEDULES = ("constant", "linear", "cosine")


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


def warmup_steps(opt: Mapping[str, Any], total_steps: int) -> int:
  if opt.get("warmup_steps"):
    return int(opt["warmup_steps"])
  return int(round(float(opt.get("warmup_ratio", 0.0)) * total_steps))


def _labels(trainable) -> Any:
  """ "lora_b" for LoRA B matrices (LoRA+), "rest" for everything else."""

  def label(path, _):
    last = getattr(path[-1], "key", None)
    return "lora_b" if last == "lora_b" else "rest"

  return jax.tree_util.tree_map_with_path(label, trainable)


def make_optimizer(
  opt: Mapping[str, Any], total_steps: int
) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """AdamW with clipping and a schedule; LoRA+ when `lora_plus_ratio` != 1.

  Args:
    opt: `learning_rate`, `schedule`, `warmup_steps` or `warmup_ratio`,
      `weight_decay`, `b1`, `b2`, `eps`, `max_grad_norm` (0 = no clipping),
      `lora_plus_ratio` (B's learning rate over A's).
    total_steps: optimizer steps of the run.

  Returns:
    (the transformation, the base learning-rate schedule for logging).
  """
  lr = schedule(
    opt.get("schedule", "constant"),
    float(opt["learning_rate"]),
    total_steps,
    warmup_steps(opt, total_steps),
  )

  def adamw(rate):
    return optax.adamw(
      rate,
      b1=float(opt.get("b1", 0.9)),
      b2=float(opt.get("b2", 0.999)),
      eps=float(opt.get("eps", 1e-8)),
      weight_decay=float(opt.get("weight_decay", 0.0)),
    )

  ratio = float(opt.get("lora_plus_ratio", 1.0))
  if ratio <= 0:
    raise ValueError(f"opt.lora_plus_ratio must be > 0, got {ratio}")
  if ratio == 1.0:
    core = adamw(lr)
  else:
    core = optax.multi_transform(
      {"rest": adamw(lr), "lora_b": adamw(lambda s: ratio * lr(s))},
      _labels,
    )
  chain = []
  clip = float(opt.get("max_grad_norm", 0.0))
  if clip < 0:
    raise ValueError(f"opt.max_grad_norm must be >= 0, got {clip}")
  if clip > 0:
    chain.append(optax.clip_by_global_norm(clip))
  chain.append(core)
  return optax.chain(*chain), lr
