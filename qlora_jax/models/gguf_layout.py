"""How llama.cpp lays out a Hugging Face decoder checkpoint in GGUF.

The one table of both directions: tensor names (`blk.3.attn_q.weight` for
`model.layers.3.self_attn.q_proj.weight`; a block's norms are named per
architecture: Gemma 3's `ffn_norm` is its pre-feed-forward norm), the
Hugging Face shapes the metadata implies, the rows of q_proj and k_proj,
which llama.cpp's converter stores in its rotary order for the `llama`
architecture (`LlamaModel.permute` in convert_hf_to_gguf.py; `qwen2`,
`qwen3` and `gemma3` are stored unpermuted), and Gemma 3's norm weights,
which the converter stores as 1 + w (its `norm_shift`: llama.cpp scales by
the weight itself, transformers by 1 + w). `gguf_reader` reads with it,
`interop.gguf_export` writes.
"""

import re
from typing import Any

import numpy as np

# general.architecture -> (model_type, transformers class, q/k permuted).
ARCHITECTURES = {
  "llama": ("llama", "LlamaForCausalLM", True),
  "qwen2": ("qwen2", "Qwen2ForCausalLM", False),
  "qwen3": ("qwen3", "Qwen3ForCausalLM", False),
  "gemma3": ("gemma3_text", "Gemma3ForCausalLM", False),
  "phi3": ("phi3", "Phi3ForCausalLM", False),
}
# Architectures whose norm weights the converter stores as 1 + w.
NORM_SHIFT = {"gemma3": 1.0}
_TOP_NAMES = {
  "token_embd.weight": "model.embed_tokens.weight",
  "output_norm.weight": "model.norm.weight",
  "output.weight": "lm_head.weight",
}
_BLOCK_NAMES = {
  "attn_q": "self_attn.q_proj",
  "attn_k": "self_attn.k_proj",
  "attn_v": "self_attn.v_proj",
  "attn_output": "self_attn.o_proj",
  "ffn_gate": "mlp.gate_proj",
  "ffn_up": "mlp.up_proj",
  "ffn_down": "mlp.down_proj",
  "attn_norm": "input_layernorm",
  "ffn_norm": "post_attention_layernorm",
  "attn_q_norm": "self_attn.q_norm",
  "attn_k_norm": "self_attn.k_norm",
}
_GEMMA3_NORMS = {
  "attn_norm": "input_layernorm",
  "post_attention_norm": "post_attention_layernorm",
  "ffn_norm": "pre_feedforward_layernorm",
  "post_ffw_norm": "post_feedforward_layernorm",
}


_PHI3_FUSED = {"attn_qkv": "self_attn.qkv_proj", "ffn_up": "mlp.gate_up_proj"}


def _block_names(arch: str) -> dict[str, str]:
  if arch == "gemma3":
    return {**_BLOCK_NAMES, **_GEMMA3_NORMS}
  if arch == "phi3":
    return {**_BLOCK_NAMES, **_PHI3_FUSED}
  return _BLOCK_NAMES


def hf_name(name: str, arch: str = "llama") -> str:
  """The transformers name of a GGUF tensor (unknown names unchanged)."""
  if name in _TOP_NAMES:
    return _TOP_NAMES[name]
  m = re.fullmatch(r"blk\.(\d+)\.(\w+)\.(weight|bias)", name)
  names = _block_names(arch)
  if m and m[2] in names:
    return f"model.layers.{m[1]}.{names[m[2]]}.{m[3]}"
  return name


def norm_shift(arch: str, key: str) -> float:
  """What the converter added to tensor `key` of `arch` (0 but for Gemma 3's
  norm weights)."""
  if key.endswith("norm.weight"):
    return NORM_SHIFT.get(arch, 0.0)
  return 0.0


def gguf_name(key: str, arch: str = "llama") -> str:
  """The llama.cpp name of a transformers tensor (inverse of `hf_name`).

  Raises:
    KeyError: a tensor llama.cpp's layout of `arch` has no name for.
  """
  top = {v: k for k, v in _TOP_NAMES.items()}
  if key in top:
    return top[key]
  block = {v: k for k, v in _block_names(arch).items()}
  m = re.fullmatch(r"model\.layers\.(\d+)\.(\w+\.\w+|\w+)\.(weight|bias)", key)
  if m is None or m[2] not in block:
    raise KeyError(f"tensor {key!r} has no GGUF name")
  return f"blk.{m[1]}.{block[m[2]]}.{m[3]}"


def permuted_heads(arch: str, key: str, config: dict[str, Any]) -> int | None:
  """Heads of a q/k tensor that llama.cpp stores permuted, else None."""
  if not ARCHITECTURES[arch][2]:
    return None
  m = re.search(r"\.(q|k)_proj\.(weight|bias)$", key)
  if m is None:
    return None
  kind = "num_attention_heads" if m[1] == "q" else "num_key_value_heads"
  return config[kind]


def unpermuted_rows(rows: int, heads: int) -> np.ndarray:
  """For each Hugging Face row, the GGUF row holding it.

  llama.cpp stores row (h, s, j) of q/k, viewed [heads, 2, rows/heads/2],
  at (h, j, s) of [heads, rows/heads/2, 2]; this gathers it back.
  """
  return (
    np.arange(rows).reshape(heads, rows // heads // 2, 2).swapaxes(1, 2)
  ).reshape(-1)


def permute_rows(array: np.ndarray, heads: int) -> np.ndarray:
  """Rows (first axis) in llama.cpp's rotary order: the inverse of gathering
  by `unpermuted_rows` (`LlamaModel.permute` of convert_hf_to_gguf.py)."""
  out = np.empty_like(array)
  out[unpermuted_rows(array.shape[0], heads)] = array
  return out


def expected_shape(key: str, cfg: dict[str, Any]) -> tuple[int, ...] | None:
  """The Hugging Face shape of tensor `key` under `cfg` (None: unknown)."""
  hidden, inter = cfg["hidden_size"], cfg["intermediate_size"]
  head_dim = cfg.get("head_dim", hidden // cfg["num_attention_heads"])
  q = cfg["num_attention_heads"] * head_dim
  kv = cfg["num_key_value_heads"] * head_dim
  vocab = (cfg["vocab_size"], hidden)
  top = {"model.embed_tokens.weight": vocab, "lm_head.weight": vocab}
  m = re.fullmatch(r"model\.layers\.\d+\.(\w+\.\w+|\w+)\.(weight|bias)", key)
  if m is None:
    return {**top, "model.norm.weight": (hidden,)}.get(key)
  linear = {  # [out, in]
    "self_attn.q_proj": (q, hidden),
    "self_attn.k_proj": (kv, hidden),
    "self_attn.v_proj": (kv, hidden),
    "self_attn.o_proj": (hidden, q),
    "mlp.gate_proj": (inter, hidden),
    "mlp.up_proj": (inter, hidden),
    "mlp.down_proj": (hidden, inter),
    "self_attn.qkv_proj": (q + 2 * kv, hidden),
    "mlp.gate_up_proj": (2 * inter, hidden),
  }
  module, leaf = m[1], m[2]
  if module.endswith("layernorm"):
    return (hidden,)
  if module in ("self_attn.q_norm", "self_attn.k_norm"):
    return (head_dim,)
  if module not in linear:
    return None
  return linear[module][:1] if leaf == "bias" else linear[module]
