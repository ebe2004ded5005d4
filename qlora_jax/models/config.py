"""Model configurations parsed from Hugging Face `config.json` files.

Three families: the Llama family (`llama`, `mistral`, `qwen2`, `qwen3`,
`gemma3_text`, `phi3`), `gpt2` and `bert`. Every field the models use is read
here, with the defaults transformers uses; anything the models cannot
honour raises.
"""

import dataclasses
import json
import math
import pathlib
from collections.abc import Mapping
from typing import Any

from qlora_jax.models.activations import ACTIVATIONS

LLAMA_TYPES = (
  "llama",
  "mistral",
  "qwen2",
  "qwen3",
  "gemma3_text",
  "phi3",
)
SUPPORTED_TYPES = LLAMA_TYPES + ("gpt2", "bert")
ROPE_TYPES = ("default", "linear", "llama3", "longrope")


class ConfigError(ValueError):
  """A config.json the models cannot honour."""


@dataclasses.dataclass(frozen=True)
class RopeConfig:
  """Rotary embeddings: base wavelength and optional frequency scaling.

  "longrope" (Phi-3's LongRoPE) divides each frequency by `short_factor`
  while a sequence fits in `original_max_positions` and by `long_factor`
  past it, and scales cos and sin by `attention_factor`.
  """

  theta: float = 10000.0
  type: str = "default"
  factor: float = 1.0
  low_freq_factor: float = 1.0
  high_freq_factor: float = 4.0
  original_max_positions: int = 8192
  short_factor: tuple[float, ...] = ()
  long_factor: tuple[float, ...] = ()
  attention_factor: float = 1.0


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
  """A Llama-family decoder (Llama, Mistral, Qwen2, Qwen3, Gemma 3 text).

  Beyond Llama's fields: `qk_norm` (an RMSNorm over each query and key
  head before the rotation: Qwen3, Gemma 3), `norm_offset` (norms scale by
  offset + weight: Gemma's 1 + w), `embed_scale` (the embeddings times
  sqrt(hidden): Gemma), `sandwich_norms` (norms after attention and
  around the MLP too: Gemma 3), `attn_scale` (the score scale when not
  head_dim ** -0.5: Gemma 3's query_pre_attn_scalar ** -0.5),
  `layer_kinds` (per layer, True for sliding-window attention; empty: every
  layer alike, `sliding_window` applying to all as in Mistral),
  `local_rope` (the rotation of the sliding layers, when it differs) and
  `final_logit_softcap` (logits = cap * tanh(logits / cap)) and `fused`
  (one `qkv_proj` and one `gate_up_proj` linear layer: Phi-3).
  """

  model_type: str
  vocab_size: int
  hidden_size: int
  intermediate_size: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  rms_norm_eps: float = 1e-6
  rope: RopeConfig = RopeConfig()
  max_positions: int = 2048
  tie_word_embeddings: bool = False
  qkv_bias: bool = False
  o_bias: bool = False
  mlp_bias: bool = False
  hidden_act: str = "silu"
  sliding_window: int | None = None
  attention_dropout: float = 0.0
  eos_token_ids: tuple[int, ...] = ()
  pad_token_id: int | None = None
  qk_norm: bool = False
  norm_offset: float = 0.0
  embed_scale: bool = False
  sandwich_norms: bool = False
  attn_scale: float | None = None
  layer_kinds: tuple[bool, ...] = ()
  local_rope: RopeConfig | None = None
  final_logit_softcap: float | None = None
  fused: bool = False


@dataclasses.dataclass(frozen=True)
class GPT2Config:
  """GPT-2: learned positions, pre-LayerNorm blocks, fused qkv."""

  vocab_size: int
  hidden_size: int
  num_layers: int
  num_heads: int
  intermediate_size: int
  max_positions: int = 1024
  layer_norm_eps: float = 1e-5
  hidden_act: str = "gelu_new"
  embd_dropout: float = 0.1
  attention_dropout: float = 0.1
  resid_dropout: float = 0.1
  tie_word_embeddings: bool = True
  eos_token_ids: tuple[int, ...] = ()
  pad_token_id: int | None = None
  model_type: str = "gpt2"

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_heads

  @property
  def num_kv_heads(self) -> int:
    return self.num_heads


@dataclasses.dataclass(frozen=True)
class BertConfig:
  """A BERT encoder: absolute positions, token types, post-LayerNorm."""

  vocab_size: int
  hidden_size: int
  num_layers: int
  num_heads: int
  intermediate_size: int
  hidden_act: str = "gelu"
  max_positions: int = 512
  type_vocab_size: int = 2
  layer_norm_eps: float = 1e-12
  hidden_dropout: float = 0.1
  attention_dropout: float = 0.1
  classifier_dropout: float | None = None
  pad_token_id: int = 0
  model_type: str = "bert"

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_heads


Config = LlamaConfig | GPT2Config | BertConfig


class _Fields:
  """Reads typed fields of a raw config, naming the file in errors."""

  def __init__(self, raw: Mapping[str, Any], source: str):
    self.raw, self.source = raw, source

  def error(self, key: str, what: str) -> ConfigError:
    return ConfigError(f"{self.source}: field {key!r} {what}")

  def get(self, key: str, kind: type, default: Any = ...) -> Any:
    value = self.raw.get(key)
    if value is None:
      if default is ...:
        raise self.error(key, "is required")
      return default
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
      value = float(value)
    if kind is int and isinstance(value, bool):
      raise self.error(key, f"must be an int, got {value!r}")
    if not isinstance(value, kind):
      raise self.error(key, f"must be {kind.__name__}, got {value!r}")
    if kind is int and value <= 0 and key != "pad_token_id":
      raise self.error(key, f"must be positive, got {value}")
    if kind is float and not math.isfinite(value):
      raise self.error(key, f"must be finite, got {value}")
    if kind is float and ("eps" in key or key == "rope_theta") and value <= 0:
      raise self.error(key, f"must be positive, got {value}")
    return value

  def activation(self, key: str, default: str) -> str:
    name = self.get(key, str, default)
    if name not in ACTIVATIONS:
      raise self.error(
        key, f"is {name!r}: supported activations are {sorted(ACTIVATIONS)}"
      )
    return name

  def token_ids(self, key: str) -> tuple[int, ...]:
    value = self.raw.get(key)
    if value is None:
      return ()
    values = value if isinstance(value, list) else [value]
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
      raise self.error(key, f"must be an int or a list of ints, got {value!r}")
    return tuple(values)

  def divides(self, key: str, total: int, by: int) -> None:
    if total % by:
      raise self.error(key, f"({by}) must divide {total}")


def _rope(
  f: _Fields,
  params: Mapping | None = None,
  key: str | None = None,
  theta_default: float = 10000.0,
) -> RopeConfig:
  # transformers 4 writes `rope_theta` + `rope_scaling`; 5 `rope_parameters`.
  if params is None:
    params = f.raw.get("rope_parameters") or f.raw.get("rope_scaling") or {}
    key = "rope_parameters" if f.raw.get("rope_parameters") else "rope_scaling"
  if not isinstance(params, Mapping):
    raise f.error(key, f"must be a mapping, got {params!r}")
  theta = params.get("rope_theta", f.raw.get("rope_theta", theta_default))
  if isinstance(theta, bool) or not isinstance(theta, (int, float)):
    raise f.error("rope_theta", f"must be a number, got {theta!r}")
  if not math.isfinite(theta) or theta <= 0:
    raise f.error("rope_theta", f"must be positive, got {theta}")
  kind = params.get("rope_type", params.get("type", "default"))
  kind = "longrope" if kind == "su" else kind  # Phi-3's first name for it
  if kind not in ROPE_TYPES:
    raise f.error(
      key, f"has rope type {kind!r}: supported types are {ROPE_TYPES}"
    )
  partial = params.get("partial_rotary_factor", 1.0)
  partial = f.raw.get("partial_rotary_factor", partial)
  if partial not in (None, 1, 1.0):
    raise f.error(key, f"partial_rotary_factor {partial} is not supported")
  if kind == "default":
    return RopeConfig(theta=float(theta))
  if kind == "longrope":
    return _longrope(f, params, key, float(theta))
  if "factor" not in params:
    raise f.error(key, f"rope type {kind!r} needs a 'factor'")
  if kind == "linear":
    return RopeConfig(float(theta), kind, float(params["factor"]))
  for name in ("low_freq_factor", "high_freq_factor"):
    if name not in params:
      raise f.error(key, f"rope type 'llama3' needs {name!r}")
  original = params.get(
    "original_max_position_embeddings",
    f.raw.get("max_position_embeddings", 8192),
  )
  return RopeConfig(
    float(theta),
    kind,
    float(params["factor"]),
    float(params["low_freq_factor"]),
    float(params["high_freq_factor"]),
    int(original),
  )


def _longrope(
  f: _Fields, params: Mapping, key: str, theta: float
) -> RopeConfig:
  """Phi-3's LongRoPE, with transformers' defaults: the pretraining length
  from the top-level `original_max_position_embeddings` (Phi-3 keeps it
  there), the attention factor sqrt(1 + ln(s) / ln(original)) for
  s = max_position_embeddings / original when `attention_factor` is unset."""
  original = f.raw.get(
    "original_max_position_embeddings",
    params.get(
      "original_max_position_embeddings",
      f.raw.get("max_position_embeddings", 2048),
    ),
  )
  if (
    isinstance(original, bool) or not isinstance(original, int) or original < 2
  ):
    raise f.error(
      "original_max_position_embeddings",
      f"must be an int of at least 2, got {original!r}",
    )
  lists = {}
  for name in ("short_factor", "long_factor"):
    value = params.get(name)
    if not isinstance(value, list) or not all(
      isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0
      for v in value
    ):
      raise f.error(
        key, f"rope type 'longrope' needs {name!r}, a list of positive numbers"
      )
    lists[name] = tuple(float(v) for v in value)
  factor = params.get("factor")
  if factor is None:
    factor = f.raw.get("max_position_embeddings", original) / original
  attention = params.get("attention_factor")
  if attention is None:
    attention = (
      math.sqrt(1 + math.log(factor) / math.log(original))
      if factor > 1
      else 1.0
    )
  return RopeConfig(
    theta,
    "longrope",
    float(factor),
    original_max_positions=original,
    short_factor=lists["short_factor"],
    long_factor=lists["long_factor"],
    attention_factor=float(attention),
  )


def _llama(f: _Fields, model_type: str) -> LlamaConfig:
  if model_type == "gemma3_text":
    return _gemma3(f)
  hidden = f.get("hidden_size", int)
  heads = f.get("num_attention_heads", int)
  kv_heads = f.get("num_key_value_heads", int, heads)
  f.divides("num_key_value_heads", heads, kv_heads)
  head_dim = _head_dim(f, hidden, heads, None)
  attention_bias = f.get("attention_bias", bool, False)
  qkv_bias = model_type == "qwen2" or attention_bias
  for key in ("resid_pdrop", "embd_pdrop"):  # Phi-3's extra dropouts
    if f.get(key, float, 0.0):
      raise f.error(key, f"is {f.raw[key]}: only 0 is supported")
  sliding = None
  if model_type in ("mistral", "phi3"):  # every layer, as transformers does
    sliding = f.get("sliding_window", int, 0) or None
  layer_types = f.raw.get("layer_types") or []
  if f.raw.get("use_sliding_window") or "sliding_attention" in layer_types:
    if model_type not in ("mistral", "phi3"):
      raise f.error(
        "use_sliding_window",
        "is set: per-layer sliding-window attention is not supported",
      )
  rope = _rope(f)
  for name in ("short_factor", "long_factor"):
    if rope.type == "longrope" and len(getattr(rope, name)) != head_dim // 2:
      raise f.error(
        "rope_scaling",
        f"{name} has {len(getattr(rope, name))} values: LongRoPE needs one "
        f"per rotated pair, head_dim / 2 = {head_dim // 2}",
      )
  return LlamaConfig(
    model_type=model_type,
    vocab_size=f.get("vocab_size", int),
    hidden_size=hidden,
    intermediate_size=f.get("intermediate_size", int),
    num_layers=f.get("num_hidden_layers", int),
    num_heads=heads,
    num_kv_heads=kv_heads,
    head_dim=head_dim,
    rms_norm_eps=f.get("rms_norm_eps", float, 1e-6),
    rope=rope,
    max_positions=f.get("max_position_embeddings", int, 2048),
    tie_word_embeddings=f.get("tie_word_embeddings", bool, False),
    qkv_bias=qkv_bias,
    o_bias=attention_bias,
    mlp_bias=f.get("mlp_bias", bool, False),
    hidden_act=f.activation("hidden_act", "silu"),
    sliding_window=sliding,
    attention_dropout=f.get("attention_dropout", float, 0.0),
    eos_token_ids=f.token_ids("eos_token_id"),
    pad_token_id=f.get("pad_token_id", int, None),
    qk_norm=model_type == "qwen3",
    fused=model_type == "phi3",
  )


def _head_dim(f: _Fields, hidden: int, heads: int, default) -> int:
  head_dim = f.get("head_dim", int, 0) or default
  if head_dim is None:
    f.divides("num_attention_heads", hidden, heads)
    head_dim = hidden // heads
  if head_dim % 2:
    raise f.error("head_dim", f"must be even for rotary embeddings: {head_dim}")
  return head_dim


SLIDING, FULL = "sliding_attention", "full_attention"


def _gemma3(f: _Fields) -> LlamaConfig:
  """Gemma 3's text model (transformers' Gemma3TextConfig, both layouts:
  `layer_types` or the older `sliding_window_pattern`; `rope_parameters`
  per layer type or `rope_theta` + `rope_local_base_freq`)."""
  hidden = f.get("hidden_size", int)
  heads = f.get("num_attention_heads", int)
  kv_heads = f.get("num_key_value_heads", int, heads)
  f.divides("num_key_value_heads", heads, kv_heads)
  head_dim = _head_dim(f, hidden, heads, 256)
  layers = f.get("num_hidden_layers", int)
  for key in ("attn_logit_softcapping", "use_bidirectional_attention"):
    if f.raw.get(key):
      raise f.error(key, f"is {f.raw[key]!r}: not supported")
  kinds = f.raw.get("layer_types")
  if kinds is None:
    pattern = f.get("sliding_window_pattern", int, 6)
    kinds = [SLIDING if (i + 1) % pattern else FULL for i in range(layers)]
  if not isinstance(kinds, list) or len(kinds) != layers:
    raise f.error("layer_types", f"must list {layers} layers, got {kinds!r}")
  for kind in kinds:
    if kind not in (SLIDING, FULL):
      raise f.error(
        "layer_types", f"has {kind!r}: expected {SLIDING!r} or {FULL!r}"
      )
  params = f.raw.get("rope_parameters") or {}
  if isinstance(params, Mapping) and FULL in params:
    rope = _rope(f, params[FULL], f"rope_parameters.{FULL}", 1e6)
    local = _rope(f, params.get(SLIDING, {}), f"rope_parameters.{SLIDING}")
  else:
    rope = _rope(f, f.raw.get("rope_scaling") or {}, "rope_scaling", 1e6)
    local = RopeConfig(theta=f.get("rope_local_base_freq", float, 10000.0))
  softcap = f.get("final_logit_softcapping", float, None)
  return LlamaConfig(
    model_type="gemma3_text",
    vocab_size=f.get("vocab_size", int),
    hidden_size=hidden,
    intermediate_size=f.get("intermediate_size", int),
    num_layers=layers,
    num_heads=heads,
    num_kv_heads=kv_heads,
    head_dim=head_dim,
    rms_norm_eps=f.get("rms_norm_eps", float, 1e-6),
    rope=rope,
    max_positions=f.get("max_position_embeddings", int, 131072),
    tie_word_embeddings=f.get("tie_word_embeddings", bool, True),
    qkv_bias=f.get("attention_bias", bool, False),
    o_bias=f.get("attention_bias", bool, False),
    hidden_act=f.activation("hidden_activation", "gelu_pytorch_tanh"),
    sliding_window=f.get("sliding_window", int, 4096),
    attention_dropout=f.get("attention_dropout", float, 0.0),
    eos_token_ids=f.token_ids("eos_token_id"),
    pad_token_id=f.get("pad_token_id", int, None),
    qk_norm=True,
    norm_offset=1.0,
    embed_scale=True,
    sandwich_norms=True,
    attn_scale=f.get("query_pre_attn_scalar", float, 256.0) ** -0.5,
    layer_kinds=tuple(kind == SLIDING for kind in kinds),
    local_rope=local,
    final_logit_softcap=softcap,
  )


def _gpt2(f: _Fields) -> GPT2Config:
  hidden = f.get("n_embd", int)
  heads = f.get("n_head", int)
  f.divides("n_head", hidden, heads)
  for key in ("scale_attn_by_inverse_layer_idx", "add_cross_attention"):
    if f.raw.get(key):
      raise f.error(key, "is set: not supported")
  if f.raw.get("scale_attn_weights", True) is not True:
    raise f.error("scale_attn_weights", "must be true")
  return GPT2Config(
    vocab_size=f.get("vocab_size", int),
    hidden_size=hidden,
    num_layers=f.get("n_layer", int),
    num_heads=heads,
    intermediate_size=f.get("n_inner", int, 4 * hidden),
    max_positions=f.get("n_positions", int, 1024),
    layer_norm_eps=f.get("layer_norm_epsilon", float, 1e-5),
    hidden_act=f.activation("activation_function", "gelu_new"),
    embd_dropout=f.get("embd_pdrop", float, 0.1),
    attention_dropout=f.get("attn_pdrop", float, 0.1),
    resid_dropout=f.get("resid_pdrop", float, 0.1),
    tie_word_embeddings=f.get("tie_word_embeddings", bool, True),
    eos_token_ids=f.token_ids("eos_token_id"),
    pad_token_id=f.get("pad_token_id", int, None),
  )


def _bert(f: _Fields) -> BertConfig:
  hidden = f.get("hidden_size", int)
  heads = f.get("num_attention_heads", int)
  f.divides("num_attention_heads", hidden, heads)
  position = f.get("position_embedding_type", str, "absolute")
  if position != "absolute":
    raise f.error(
      "position_embedding_type",
      f"is {position!r}: only 'absolute' is supported",
    )
  if f.raw.get("is_decoder") or f.raw.get("add_cross_attention"):
    raise f.error("is_decoder", "is set: only the encoder is supported")
  return BertConfig(
    vocab_size=f.get("vocab_size", int),
    hidden_size=hidden,
    num_layers=f.get("num_hidden_layers", int),
    num_heads=heads,
    intermediate_size=f.get("intermediate_size", int),
    hidden_act=f.activation("hidden_act", "gelu"),
    max_positions=f.get("max_position_embeddings", int, 512),
    type_vocab_size=f.get("type_vocab_size", int, 2),
    layer_norm_eps=f.get("layer_norm_eps", float, 1e-12),
    hidden_dropout=f.get("hidden_dropout_prob", float, 0.1),
    attention_dropout=f.get("attention_probs_dropout_prob", float, 0.1),
    classifier_dropout=f.get("classifier_dropout", float, None),
    pad_token_id=f.get("pad_token_id", int, 0),
  )


def from_dict(raw: Mapping[str, Any], source: str = "config") -> Config:
  """A model config from the contents of a Hugging Face config.json.

  Raises:
    ConfigError: an unsupported `model_type`, a missing or ill-typed field,
      or an option the models do not implement; the message names `source`.
  """
  if not isinstance(raw, Mapping):
    raise ConfigError(f"{source}: expected a JSON object, got {type(raw)}")
  model_type = raw.get("model_type")
  f = _Fields(raw, source)
  if model_type in LLAMA_TYPES:
    return _llama(f, model_type)
  if model_type == "gpt2":
    return _gpt2(f)
  if model_type == "bert":
    return _bert(f)
  raise f.error(
    "model_type",
    f"is {model_type!r}: supported model types are {SUPPORTED_TYPES}",
  )


def read_config(path: str | pathlib.Path) -> Config:
  """Parses a config.json file (see `from_dict`)."""
  path = pathlib.Path(path)
  if not path.is_file():
    raise ConfigError(f"no config file at {path}")
  try:
    raw = json.loads(path.read_text())
  except json.JSONDecodeError as e:
    raise ConfigError(f"{path}: invalid JSON: {e}") from e
  return from_dict(raw, str(path))
