"""QLoRA layers: frozen (quantized) bases, LoRA adapters, trainable trees.

Flax modules and tree helpers that know nothing of any model; imports
`qlora_jax.quant` only.
"""

from qlora_jax.nn.cpu_matmul import matmul_q8_0
from qlora_jax.nn.dense import BASE, PARAMS, QLoRADense, base_param, path_name
from qlora_jax.nn.hash_dropout import Dropout, dropout
from qlora_jax.nn.lora import INITS, LoraSpec, full_a, init_adapter
from qlora_jax.nn.matmul import (
  KERNELS,
  dequantized,
  frozen_matmul,
  quantized_matmul,
  resolve_kernel,
  upcast_matmul,
)
from qlora_jax.nn.merge import merge_adapters, merged_weight, unmerge_adapters
from qlora_jax.nn.plan import (
  ALL_LINEAR,
  FLOAT,
  LayerSpec,
  LoraTargets,
  Plan,
  QuantTargets,
  check_pair,
  make_plan,
  plan_lines,
  select,
)
from qlora_jax.nn.trees import (
  flatten,
  merge_trees,
  num_bytes,
  num_params,
  split_trainable,
  unflatten,
)

__all__ = [
  "ALL_LINEAR",
  "BASE",
  "FLOAT",
  "LoraTargets",
  "QuantTargets",
  "check_pair",
  "Dropout",
  "INITS",
  "KERNELS",
  "PARAMS",
  "LayerSpec",
  "LoraSpec",
  "Plan",
  "QLoRADense",
  "base_param",
  "dequantized",
  "dropout",
  "flatten",
  "frozen_matmul",
  "init_adapter",
  "matmul_q8_0",
  "full_a",
  "make_plan",
  "merge_adapters",
  "merge_trees",
  "merged_weight",
  "num_bytes",
  "num_params",
  "path_name",
  "plan_lines",
  "quantized_matmul",
  "resolve_kernel",
  "select",
  "split_trainable",
  "unflatten",
  "upcast_matmul",
  "unmerge_adapters",
]
