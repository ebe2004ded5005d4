"""The training recipes that benchmarks and tables compare, as config
overrides (a table's "mode" column; not `train.mode`).

Each recipe is a dict of dotted overrides of a run's config (as a sweep
point gives them): full fine-tuning, LoRA over a float32 or a bfloat16
frozen base, and QLoRA over an NF4 + double-quantized base. A table adds
what it varies beyond the mode (a learning rate, a compute dtype).
"""

from collections.abc import Mapping
from typing import Any

from qlora_jax import nn as qnn

RECIPES: dict[str, dict[str, Any]] = {
  "full": {
    "train.mode": "full",
    "quant.data_type": "none",
    "lora.enabled": False,
  },
  "lora_f32": {"quant.data_type": "none"},
  "lora_bf16": {"quant.data_type": "none", "model.base_dtype": "bfloat16"},
  "qlora_nf4_dq": {"quant.data_type": "nf4", "quant.double_quant": True},
}


def overrides(mode: str, extra: Mapping[str, Any] | None = None) -> dict:
  """The dotted overrides of `mode`, followed by `extra`'s."""
  if mode not in RECIPES:
    raise ValueError(f"unknown mode {mode!r}, expected one of {list(RECIPES)}")
  return {**RECIPES[mode], **(extra or {})}


def plan_inputs(mode: str, rank: int) -> tuple:
  """(lora, quant, base dtype name, train patterns) of `mode`, as
  `models.model_plan` and `nn.split_trainable` take them: LoRA of `rank`
  (alpha 2 * rank, no dropout) on every linear layer, block 64."""
  o = overrides(mode)
  lora = None
  if o.get("lora.enabled", True):
    lora = qnn.LoraTargets(qnn.LoraSpec(rank=rank, alpha=2.0 * rank))
  quant = qnn.QuantTargets.parse(
    {
      "data_type": o["quant.data_type"],
      "block_size": 64,
      "double_quant": o.get("quant.double_quant", True),
    }
  )
  base_dtype = o.get("model.base_dtype", "float32")
  patterns = [".*"] if o.get("train.mode") == "full" else []
  return lora, quant, base_dtype, patterns
