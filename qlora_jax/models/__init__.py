"""Llama-family, GPT-2 and BERT models built from QLoRA layers, and loading
Hugging Face checkpoints into them with quantize-on-load."""

from qlora_jax.models.attention import KVCache
from qlora_jax.models.bert import (
  BertForSequenceClassification,
  BertModel,
  mean_pool,
)
from qlora_jax.models.config import (
  SUPPORTED_TYPES,
  BertConfig,
  ConfigError,
  GPT2Config,
  LlamaConfig,
  RopeConfig,
  from_dict,
  read_config,
)
from qlora_jax.models.generation import generate, select_tokens
from qlora_jax.models.gpt2 import GPT2LMHeadModel
from qlora_jax.models.inference import checkpoint_outputs
from qlora_jax.models.layers import Options
from qlora_jax.models.llama import LlamaForCausalLM
from qlora_jax.models.loading import LoadStats
from qlora_jax.models.minilm import minilm_path
from qlora_jax.models.pretrained import (
  Pretrained,
  from_pretrained,
  init_random,
  model_plan,
)
from qlora_jax.models.registry import TASKS, ModelSpec
from qlora_jax.models.safetensors_reader import CheckpointError

__all__ = [
  "SUPPORTED_TYPES",
  "TASKS",
  "BertConfig",
  "BertForSequenceClassification",
  "BertModel",
  "CheckpointError",
  "ConfigError",
  "GPT2Config",
  "GPT2LMHeadModel",
  "KVCache",
  "LlamaConfig",
  "LlamaForCausalLM",
  "LoadStats",
  "ModelSpec",
  "Options",
  "Pretrained",
  "RopeConfig",
  "checkpoint_outputs",
  "from_dict",
  "from_pretrained",
  "generate",
  "init_random",
  "mean_pool",
  "minilm_path",
  "model_plan",
  "read_config",
  "select_tokens",
]
