"""Llama-family, GPT-2 and BERT models built from QLoRA layers, and loading
Hugging Face checkpoints and llama.cpp GGUF files into them with
quantize-on-load.

Models know nothing of training; imports `qlora_jax.nn` and `qlora_jax.quant`.
"""

from qlora_jax.models.attention import KVCache
from qlora_jax.models.bert import (
  BertForSequenceClassification,
  BertModel,
  mean_pool,
)
from qlora_jax.models.config import (
  SUPPORTED_TYPES,
  BertConfig,
  Config,
  ConfigError,
  GPT2Config,
  LlamaConfig,
  RopeConfig,
  from_dict,
  read_config,
)
from qlora_jax.models.decode_heads import HEADS as DECODE_HEADS
from qlora_jax.models.decode_heads import decode_head
from qlora_jax.models.gemma3_file import gemma3_path
from qlora_jax.models.generation import generate, select_tokens, stream
from qlora_jax.models.gguf_reader import GGUFCheckpoint, gguf_config, read_gguf
from qlora_jax.models.gguf_tokenizer import GGUFTokenizer, gguf_tokenizer
from qlora_jax.models.gpt2 import GPT2LMHeadModel
from qlora_jax.models.inference import checkpoint_outputs
from qlora_jax.models.layers import Options
from qlora_jax.models.llama import LlamaForCausalLM
from qlora_jax.models.loading import LoadStats
from qlora_jax.models.minilm import minilm_path
from qlora_jax.models.pretrained import (
  ModelOptions,
  Pretrained,
  checkpoint_config,
  from_checkpoint,
  from_pretrained,
  init_random,
  is_gguf,
  layer_options,
  model_options,
  model_plan,
)
from qlora_jax.models.registry import MODEL_TASKS, ModelSpec
from qlora_jax.models.safetensors_reader import CheckpointError
from qlora_jax.models.smollm2 import smollm2_path

__all__ = [
  "DECODE_HEADS",
  "decode_head",
  "gemma3_path",
  "smollm2_path",
  "read_gguf",
  "is_gguf",
  "gguf_tokenizer",
  "gguf_config",
  "checkpoint_config",
  "GGUFTokenizer",
  "GGUFCheckpoint",
  "SUPPORTED_TYPES",
  "MODEL_TASKS",
  "BertConfig",
  "Config",
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
  "ModelOptions",
  "ModelSpec",
  "Options",
  "Pretrained",
  "RopeConfig",
  "checkpoint_outputs",
  "from_dict",
  "from_checkpoint",
  "from_pretrained",
  "generate",
  "init_random",
  "mean_pool",
  "minilm_path",
  "model_options",
  "layer_options",
  "model_plan",
  "read_config",
  "select_tokens",
  "stream",
]
