"""Reads llama.cpp GGUF files as Hugging Face checkpoints, tensor by tensor.

A GGUF file holds metadata (the model's hyperparameters, its tokenizer)
and tensors under llama.cpp's names (`blk.3.attn_q.weight`), with their
dimensions listed innermost first and most of them block-quantized.
`GGUFCheckpoint` shows them under transformers' names and shapes, and
`read` dequantizes one tensor to float32 with the `gguf` package (the
header is parsed by `gguf_header`). For the `llama` architecture,
llama.cpp's converter reorders the rows of q_proj and k_proj (weights and
biases) for its rotary layout (`LlamaModel.permute` in
convert_hf_to_gguf.py); `read` puts them back, so the values equal the
Hugging Face checkpoint's up to quantization; the other architectures are
stored unpermuted, Gemma 3's norms as 1 + w (undone on read).
Names, shapes and row order are `gguf_layout`'s; `gguf_q4_1` decodes Q4_1
matrices without requantization.
"""

import functools
import pathlib
from typing import Any

import gguf
import numpy as np
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

from qlora_jax import quant
from qlora_jax.models import gguf_layout
from qlora_jax.models.gguf_header import GGUFFile, TensorInfo, read_gguf
from qlora_jax.models.gguf_q4_1 import Q4_1_SPEC, q4_1_to_quantized
from qlora_jax.models.safetensors_reader import CheckpointError

_CHUNK = 1 << 20  # elements dequantized (and checked) at a time


def _as_file(source: "str | pathlib.Path | GGUFFile") -> GGUFFile:
  return source if isinstance(source, GGUFFile) else read_gguf(source)


def _float32(value: float) -> float:
  """The shortest decimal of a float32 (1e-05, not 9.999999747378752e-06)."""
  return float(str(np.float32(value)))


def gguf_config(source: "str | pathlib.Path | GGUFFile") -> dict[str, Any]:
  """A Hugging Face config.json dict from a GGUF file's metadata.

  Raises:
    CheckpointError: an unsupported architecture or option, or a missing
      metadata key; the message names the file and the key.
  """
  f = _as_file(source)
  arch = f.architecture
  model_type, class_name, _ = gguf_layout.ARCHITECTURES[arch]
  p = f"{arch}."
  hidden = f.get(p + "embedding_length", int)
  heads = f.get(p + "attention.head_count", int)
  if f.get(p + "expert_count", int, 0):
    raise CheckpointError(
      f"{f.path}: metadata key {p + 'expert_count'!r} is set: mixture-of-"
      "experts models are not supported"
    )
  vocab = f.metadata.get(p + "vocab_size")
  if vocab is None:  # older files: as many as the tokenizer's tokens
    vocab = len(f.get("tokenizer.ggml.tokens", list))
  cfg = {
    "architectures": [class_name],
    "model_type": model_type,
    "vocab_size": vocab,
    "hidden_size": hidden,
    "intermediate_size": f.get(p + "feed_forward_length", int),
    "num_hidden_layers": f.get(p + "block_count", int),
    "num_attention_heads": heads,
    "num_key_value_heads": f.get(p + "attention.head_count_kv", int, heads),
    "max_position_embeddings": f.get(p + "context_length", int),
    "rms_norm_eps": _float32(
      f.get(p + "attention.layer_norm_rms_epsilon", float)
    ),
    "rope_theta": _float32(f.get(p + "rope.freq_base", float, 10000.0)),
    "tie_word_embeddings": "output.weight" not in f.tensors,
  }
  if arch == "gemma3":
    cfg.update(_gemma3(f, p, hidden, heads))
  else:
    cfg["hidden_act"] = "silu"
  if arch == "phi3":
    window = f.get(p + "attention.sliding_window", int, 0)
    if window:
      cfg["sliding_window"] = window
  head_dim = f.get(p + "attention.key_length", int, hidden // heads)
  if head_dim != hidden // heads:
    cfg["head_dim"] = head_dim
  rope_dims = f.get(p + "rope.dimension_count", int, head_dim)
  if rope_dims != head_dim:
    raise CheckpointError(
      f"{f.path}: metadata key {p + 'rope.dimension_count'!r} is "
      f"{rope_dims}, not the head size {head_dim}: partial rotary "
      "embeddings are not supported"
    )
  cfg.update(_rope_scaling(f, p))
  for name in ("bos", "eos", "padding"):
    token_id = f.get(f"tokenizer.ggml.{name}_token_id", int, None)
    if token_id is not None:
      cfg[f"{'pad' if name == 'padding' else name}_token_id"] = token_id
  return cfg


def _gemma3(f: GGUFFile, p: str, hidden: int, heads: int) -> dict[str, Any]:
  """Gemma 3's fields beyond Llama's, as llama.cpp's gemma3 model reads
  them: every sixth layer attends globally (its fixed pattern), sliding
  layers rotate with base 10000, the scores scale by head_dim ** -0.5."""
  head_dim = f.get(p + "attention.key_length", int, hidden // heads)
  out = {
    "head_dim": head_dim,
    "hidden_activation": "gelu_pytorch_tanh",
    "sliding_window": f.get(p + "attention.sliding_window", int),
    "sliding_window_pattern": 6,
    "rope_local_base_freq": 10000.0,
    "query_pre_attn_scalar": head_dim,
  }
  softcap = f.get(p + "final_logit_softcapping", float, None)
  if softcap:
    out["final_logit_softcapping"] = softcap
  return out


# Phi-3's LongRoPE factors: configuration stored as tensors, not weights.
LONGROPE_TENSORS = {
  "rope_factors_short.weight": "short_factor",
  "rope_factors_long.weight": "long_factor",
}


def rope_factors(source: "str | pathlib.Path | GGUFFile") -> dict:
  """The file's LongRoPE factor tensors {GGUF name: float32 [head_dim / 2]}
  (empty when it has none)."""
  f = _as_file(source)
  out = {}
  for name in LONGROPE_TENSORS:
    t = f.tensors.get(name)
    if t is None:
      continue
    what = f"tensor {name!r} in {f.path}"
    shape = tuple(reversed(t.dims))
    try:
      raw = _read_rows(f.path, t, shape, None)
    except OSError as e:
      raise CheckpointError(f"{what}: {e}") from e
    out[name] = _dequantize(raw, t.qtype, shape, what).reshape(-1).copy()
  return out


def _longrope(f: GGUFFile, p: str) -> dict[str, Any]:
  """LongRoPE as llama.cpp's converter stores Phi-3-128k's: both factor
  lists as tensors, the pretraining length and the attention factor in
  the metadata."""
  factors = rope_factors(f)
  missing = sorted(set(LONGROPE_TENSORS) - set(factors))
  if missing:
    raise CheckpointError(
      f"{f.path}: tensor {missing[0]!r} is missing: LongRoPE needs both "
      f"{sorted(LONGROPE_TENSORS)}"
    )
  scaling = {"rope_type": "longrope"}
  for name, field in LONGROPE_TENSORS.items():
    scaling[field] = [float(v) for v in factors[name]]
  attn = f.get(p + "rope.scaling.attn_factor", float, None)
  if attn is not None:
    scaling["attention_factor"] = _float32(attn)
  return {
    "rope_scaling": scaling,
    "original_max_position_embeddings": f.get(
      p + "rope.scaling.original_context_length", int
    ),
  }


def _rope_scaling(f: GGUFFile, p: str) -> dict[str, Any]:
  if any(name in f.tensors for name in LONGROPE_TENSORS):
    return _longrope(f, p)
  if "rope_freqs.weight" in f.tensors:
    raise CheckpointError(
      f"{f.path}: tensor 'rope_freqs.weight' (Llama 3.1 style rotary "
      "frequency scaling) is not supported"
    )
  kind = f.get(p + "rope.scaling.type", str, "none")
  if kind == "none":
    return {}
  if kind != "linear":
    raise CheckpointError(
      f"{f.path}: metadata key {p + 'rope.scaling.type'!r} is {kind!r}: "
      "only 'none' and 'linear' are supported"
    )
  factor = _float32(f.get(p + "rope.scaling.factor", float))
  return {"rope_scaling": {"rope_type": "linear", "factor": factor}}


@functools.cache
def dequantizable(qtype: GGMLQuantizationType) -> bool:
  """Whether `gguf.quants.dequantize` handles `qtype` (tries one block)."""
  block, size = GGML_QUANT_SIZES[qtype]
  try:
    out = gguf.quants.dequantize(np.zeros((1, size), np.uint8), qtype)
  except NotImplementedError:
    return False
  return np.asarray(out).size == block


class GGUFCheckpoint:
  """The tensors of one GGUF file under Hugging Face names and shapes.

  The interface of `safetensors_reader.Checkpoint`: `keys`, `shape`,
  `read` (float32, finite, in Hugging Face layout), `file`, `folder`,
  `where`. Names, shapes and types are checked against the metadata up
  front; each `read` opens the file anew and holds one tensor.
  """

  def __init__(self, source: "str | pathlib.Path | GGUFFile"):
    f = _as_file(source)
    self.path, self.folder = f.path, f.path.parent
    self.config = gguf_config(f)
    self._tensors: dict[str, TensorInfo] = {}
    self._heads: dict[str, int] = {}  # key -> heads of a permuted tensor
    self._arch = f.architecture
    for t in f.tensors.values():
      if t.name in LONGROPE_TENSORS:  # read into the config
        continue
      key = gguf_layout.hf_name(t.name, f.architecture)
      self._check(key, t)
      self._tensors[key] = t
      heads = gguf_layout.permuted_heads(f.architecture, key, self.config)
      if heads:
        self._heads[key] = heads
    self.where = {k: self.path for k in self._tensors}

  def _check(self, key: str, t: TensorInfo) -> None:
    what = f"tensor {key!r} ({t.name} in {self.path})"
    if key in self._tensors:
      raise CheckpointError(f"{what} appears twice")
    if not dequantizable(t.qtype):
      raise CheckpointError(
        f"{what} has type {t.qtype.name}, which gguf cannot dequantize"
      )
    want = gguf_layout.expected_shape(key, self.config)
    shape = tuple(reversed(t.dims))
    if want is not None and shape != want:
      raise CheckpointError(
        f"{what} has shape {shape}, but the file's metadata gives {want}"
      )

  def keys(self) -> list[str]:
    return list(self._tensors)

  def file(self, key: str) -> pathlib.Path:
    return self.where[key]

  def shape(self, key: str) -> tuple[int, ...]:
    return tuple(reversed(self._tensors[key].dims))

  def gguf_type(self, key: str) -> str:
    """The stored type of tensor `key` ("Q4_1", "F32", ...)."""
    return self._tensors[key].qtype.name

  def read_quantized(
    self, key: str, spec: "quant.QuantSpec | None"
  ) -> "quant.QuantizedTensor | None":
    """Matrix `key` as a QuantizedTensor of `spec`, taken from the file
    without requantization when its stored type is exactly that layout
    (Q4_1 for int4_asym in blocks of 32 without double quantization); None
    otherwise (then `read` and quantize)."""
    t = self._tensors[key]
    shape = self.shape(key)
    if spec != Q4_1_SPEC or t.qtype != GGMLQuantizationType.Q4_1:
      return None
    if len(shape) != 2:
      return None
    heads = self._heads.get(key)
    order = gguf_layout.unpermuted_rows(shape[0], heads) if heads else None
    what = f"tensor {key!r} ({t.name} in {self.path})"
    try:
      raw = _read_rows(self.path, t, shape, order)
    except OSError as e:
      raise CheckpointError(f"{what}: {e}") from e
    return q4_1_to_quantized(raw, shape, what)

  def read(self, key: str) -> np.ndarray:
    """Tensor `key` as float32 in Hugging Face layout, checked finite."""
    t = self._tensors[key]
    what = f"tensor {key!r} ({t.name} in {self.path})"
    shape = self.shape(key)
    heads = self._heads.get(key)
    order = gguf_layout.unpermuted_rows(shape[0], heads) if heads else None
    try:
      raw = _read_rows(self.path, t, shape, order if len(shape) > 1 else None)
    except OSError as e:
      raise CheckpointError(f"{what}: {e}") from e
    array = _dequantize(raw, t.qtype, shape, what)
    if heads and len(shape) == 1:  # biases: reorder the values
      array = array[order]
    shift = gguf_layout.norm_shift(self._arch, key)
    if shift:  # stored as shift + w: Gemma 3's norms
      array = array - np.float32(shift)
    return array


def _read_rows(
  path: pathlib.Path,
  t: TensorInfo,
  shape: tuple[int, ...],
  order: np.ndarray | None,
) -> np.ndarray:
  """The tensor's bytes [rows, bytes per row], rows gathered by `order`."""
  rows = shape[0] if len(shape) > 1 else 1
  buf = np.empty((rows, t.nbytes // rows), np.uint8)
  with open(path, "rb") as f:
    if order is None:
      f.seek(t.offset)
      got = f.readinto(memoryview(buf).cast("B"))
      if got != t.nbytes:
        raise OSError(f"read {got} of {t.nbytes} bytes (truncated?)")
      return buf
    for row, src in enumerate(order):
      f.seek(t.offset + int(src) * buf.shape[1])
      if f.readinto(memoryview(buf[row])) != buf.shape[1]:
        raise OSError(f"row {src} is beyond the end of the file (truncated?)")
  return buf


def _dequantize(
  raw: np.ndarray, qtype: GGMLQuantizationType, shape: tuple, what: str
) -> np.ndarray:
  """float32 `shape` from bytes [rows, bytes per row], checked in chunks."""
  if qtype == GGMLQuantizationType.F32:
    out = raw.view(np.float32).reshape(shape)  # no copy
  else:
    out = np.empty(shape, np.float32)
  rows = out.reshape(raw.shape[0], -1)
  step = max(1, _CHUNK // max(rows.shape[1], 1))
  for start in range(0, rows.shape[0], step):
    part = rows[start : start + step]
    if qtype != GGMLQuantizationType.F32:
      part[...] = gguf.quants.dequantize(raw[start : start + step], qtype)
    finite = np.isfinite(part)
    if not finite.all():
      flat = start * rows.shape[1] + int(np.argmin(finite))
      index = tuple(int(i) for i in np.unravel_index(flat, shape))
      raise CheckpointError(f"{what} has a non-finite value at index {index}")
  return out
