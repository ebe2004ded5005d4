"""Interop with PEFT, transformers and llama.cpp: adapters out (PEFT
folders, llama.cpp LoRA GGUF files) and in, merged models out.

Format conversion only: imports `quant`, `nn`, `models` (and `data`), never
the engine (a training run's export is `qlora_jax.engine.export`).
"""

from qlora_jax.interop.hf_export import merge, merged_model, write_merged
from qlora_jax.interop.peft import write_adapter
from qlora_jax.interop.peft_config import AdapterError
from qlora_jax.interop.peft_import import (
  Adapter,
  apply_adapter,
  from_peft,
  read_adapter,
)

__all__ = [
  "Adapter",
  "AdapterError",
  "apply_adapter",
  "from_peft",
  "merge",
  "merged_model",
  "read_adapter",
  "write_adapter",
  "write_merged",
]
