"""Reads llama.cpp GGUF files as Hugging Face checkpoints, tensor by tensor.

A GGUF file holds metadata (the model's hyperparameters, its tokenizer)
and tensors under llama.cpp's names (`blk.3.attn_q.weight`), with their
dimensions listed innermost first and most of them block-quantized.
`GGUFCheckpoint` shows them under transformers' names and shapes, and
`read` dequantizes one tensor to float32 with the `gguf` package. For the
`llama` architecture, llama.cpp's converter reorders the rows of q_proj
and k_proj (weights and biases) for its rotary layout (`LlamaModel.permute`
in convert_hf_to_gguf.py); `read` puts them back, so the values equal the
Hugging Face checkpoint's up to quantization. `qwen2` is stored unpermuted.
"""

import dataclasses
import functools
import pathlib
import re
import types
from collections.abc import Mapping
from typing import Any

import gguf
import jax.numpy as jnp
import numpy as np
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

from qlora_jax import quant
from qlora_jax.models.safetensors_reader import CheckpointError

# GGML's Q4_1 is our int4_asym in blocks of 32 (float16 d and m).
Q4_1_SPEC = quant.QuantSpec("int4_asym", 32, False)

# general.architecture -> (model_type, transformers class, q/k permuted).
ARCHITECTURES = {
  "llama": ("llama", "LlamaForCausalLM", True),
  "qwen2": ("qwen2", "Qwen2ForCausalLM", False),
}
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
}
_CHUNK = 1 << 20  # elements dequantized (and checked) at a time


@dataclasses.dataclass(frozen=True)
class TensorInfo:
  """Where one tensor lies in the file (dims innermost first, as stored)."""

  name: str
  qtype: GGMLQuantizationType
  dims: tuple[int, ...]
  offset: int
  nbytes: int


@dataclasses.dataclass(frozen=True)
class GGUFFile:
  """A GGUF file's metadata (decoded) and its tensors' places."""

  path: pathlib.Path
  metadata: Mapping[str, Any]
  tensors: Mapping[str, TensorInfo]

  def get(self, key: str, kind: type = object, default: Any = ...) -> Any:
    """The metadata value `key`; raises naming file and key if absent."""
    value = self.metadata.get(key)
    if value is None:
      if default is ...:
        raise CheckpointError(f"{self.path}: missing metadata key {key!r}")
      return default
    if kind is float and isinstance(value, int):
      value = float(value)
    if not isinstance(value, kind) or (kind is int and type(value) is bool):
      raise CheckpointError(
        f"{self.path}: metadata key {key!r} must be {kind.__name__}, got "
        f"{value!r}"
      )
    return value

  @property
  def architecture(self) -> str:
    """`general.architecture`, checked to be supported."""
    arch = self.get("general.architecture", str)
    if arch not in ARCHITECTURES:
      raise CheckpointError(
        f"{self.path}: metadata key 'general.architecture' is {arch!r}: "
        f"supported architectures are {sorted(ARCHITECTURES)}"
      )
    return arch


class _Reader(gguf.GGUFReader):
  """`gguf.GGUFReader`, checking each tensor's type and extent first."""

  def __init__(self, path: pathlib.Path):
    self.path = path
    super().__init__(path)

  def _build_tensors(self, start_offs: int, fields: list) -> None:
    for field in fields:
      _, name, _, dims, raw_type, offset = field.parts
      what = f"{self.path}: tensor {bytes(name).decode(errors='replace')!r}"
      try:
        qtype = GGMLQuantizationType(int(raw_type[0]))
      except ValueError:
        raise CheckpointError(
          f"{what} has unknown ggml type id {int(raw_type[0])}"
        ) from None
      block, size = GGML_QUANT_SIZES[qtype]
      if int(dims[0]) % block:
        raise CheckpointError(
          f"{what} has rows of {int(dims[0])}: not whole {qtype.name} blocks"
        )
      end = start_offs + int(offset[0]) + int(np.prod(dims)) // block * size
      if end > self.data.size:
        raise CheckpointError(
          f"{what} has data ending at byte {end}, but the file has "
          f"{self.data.size} bytes (truncated?)"
        )
    super()._build_tensors(start_offs, fields)


def read_gguf(path: str | pathlib.Path) -> GGUFFile:
  """Parses a GGUF file's header: metadata and tensor places, no data.

  The header of a file read before is returned again while the file's
  size, modification time and inode are unchanged (parsing SmolLM2's
  49,152-token vocabulary takes seconds, and one run reads the header for
  the config, the tokenizer and the weights). The returned metadata is a
  read-only mapping.

  Raises:
    CheckpointError: not a GGUF file, truncated, or a tensor of an
      unknown type; the message names the file (and the tensor).
  """
  path = pathlib.Path(path)
  if not path.is_file():
    raise CheckpointError(f"no GGUF file at {path}")
  st = path.stat()
  key = (str(path.resolve()), st.st_size, st.st_mtime_ns, st.st_ino)
  return _read_header(path, key)


@functools.lru_cache(maxsize=4)
def _read_header(path: pathlib.Path, key: tuple) -> GGUFFile:
  del key  # the cache key: the file's identity and version
  try:
    reader = _Reader(path)
    fields = reader.fields.items()
    metadata = {k: f.contents() for k, f in fields if k[:5] != "GGUF."}
  except CheckpointError:
    raise
  except (ValueError, IndexError, KeyError, OverflowError) as e:
    raise CheckpointError(
      f"{path}: cannot read the GGUF header (truncated or not GGUF?): {e}"
    ) from e
  tensors = {}
  for t in reader.tensors:
    dims = tuple(int(d) for d in t.shape)
    where = int(t.data_offset), int(t.n_bytes)
    tensors[t.name] = TensorInfo(t.name, t.tensor_type, dims, *where)
  del reader, fields  # unmaps the file
  return GGUFFile(
    path, types.MappingProxyType(metadata), types.MappingProxyType(tensors)
  )


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
  model_type, class_name, _ = ARCHITECTURES[arch]
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
    "hidden_act": "silu",
  }
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


def _rope_scaling(f: GGUFFile, p: str) -> dict[str, Any]:
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


def hf_name(name: str) -> str:
  """The transformers name of a GGUF tensor (unknown names unchanged)."""
  if name in _TOP_NAMES:
    return _TOP_NAMES[name]
  m = re.fullmatch(r"blk\.(\d+)\.(\w+)\.(weight|bias)", name)
  if m and m[2] in _BLOCK_NAMES:
    return f"model.layers.{m[1]}.{_BLOCK_NAMES[m[2]]}.{m[3]}"
  return name


def gguf_name(key: str) -> str:
  """The llama.cpp name of a transformers tensor (inverse of `hf_name`).

  Raises:
    KeyError: a tensor llama.cpp's llama/qwen2 layout has no name for.
  """
  top = {v: k for k, v in _TOP_NAMES.items()}
  if key in top:
    return top[key]
  block = {v: k for k, v in _BLOCK_NAMES.items()}
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


def permute_rows(array: np.ndarray, heads: int) -> np.ndarray:
  """Rows (first axis) in llama.cpp's rotary order: inverse of what `read`
  undoes (`LlamaModel.permute` of convert_hf_to_gguf.py)."""
  out = np.empty_like(array)
  out[_unpermuted_rows(array.shape[0], heads)] = array
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
  }
  module, leaf = m[1], m[2]
  if module.endswith("layernorm"):
    return (hidden,)
  if module not in linear:
    return None
  return linear[module][:1] if leaf == "bias" else linear[module]


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
    for t in f.tensors.values():
      key = hf_name(t.name)
      self._check(key, t)
      self._tensors[key] = t
      heads = permuted_heads(f.architecture, key, self.config)
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
    want = expected_shape(key, self.config)
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
    order = _unpermuted_rows(shape[0], heads) if heads else None
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
    order = _unpermuted_rows(shape[0], heads) if heads else None
    try:
      raw = _read_rows(self.path, t, shape, order if len(shape) > 1 else None)
    except OSError as e:
      raise CheckpointError(f"{what}: {e}") from e
    array = _dequantize(raw, t.qtype, shape, what)
    if heads and len(shape) == 1:  # biases: reorder the values
      array = array[order]
    return array


def _unpermuted_rows(rows: int, heads: int) -> np.ndarray:
  """For each Hugging Face row, the GGUF row holding it.

  llama.cpp stores row (h, s, j) of q/k, viewed [heads, 2, rows/heads/2],
  at (h, j, s) of [heads, rows/heads/2, 2]; this gathers it back.
  """
  return (
    np.arange(rows).reshape(heads, rows // heads // 2, 2).swapaxes(1, 2)
  ).reshape(-1)


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


def q4_1_to_quantized(raw: np.ndarray, shape, what: str):
  """GGML Q4_1 blocks (bytes [rows, bytes per row]: per block float16 d,
  float16 m, 16 bytes of codes, element j in the low nibble of byte j and
  element j + 16 in its high nibble) as an int4_asym QuantizedTensor."""
  blocks = raw.reshape(-1, 20)
  d = blocks[:, 0:2].copy().view(np.float16).reshape(-1)
  m = blocks[:, 2:4].copy().view(np.float16).reshape(-1)
  for name, part in (("scale d", d), ("minimum m", m)):
    if not np.isfinite(part).all():
      block = int(np.argmin(np.isfinite(part)))
      raise CheckpointError(f"{what} has a non-finite {name} in block {block}")
  qs = blocks[:, 4:]
  q = np.concatenate([qs & 0xF, qs >> 4], axis=1).reshape(-1)
  codes = (q[0::2] << 4) | q[1::2]  # ours: first code in the high nibble
  return quant.QuantizedTensor(
    jnp.asarray(codes),
    jnp.asarray(d),
    None,
    None,
    shape=tuple(shape),
    data_type=Q4_1_SPEC.data_type,
    block_size=Q4_1_SPEC.block_size,
    dtype="float32",
    minimum=jnp.asarray(m),
  )


def quantized_to_q4_1(qt) -> np.ndarray:
  """An int4_asym QuantizedTensor in blocks of 32 (one matrix) as GGML Q4_1
  bytes [rows, bytes per row]; a float32 minimum (an exact QA-LoRA merge)
  is rounded to float16, the format's type."""
  if qt.spec != Q4_1_SPEC or qt.ndim != 2 or qt.shape[1] % 32:
    raise ValueError(f"{qt.spec} of shape {qt.shape} is not Q4_1's layout")
  codes = np.asarray(qt.codes)
  q = np.empty(codes.size * 2, np.uint8)
  q[0::2], q[1::2] = codes >> 4, codes & 0xF
  q = q[: qt.size].reshape(-1, 32)
  qs = q[:, :16] | (q[:, 16:] << 4)
  d = np.asarray(qt.absmax).astype(np.float16).view(np.uint8).reshape(-1, 2)
  m = np.asarray(qt.minimum).astype(np.float16).view(np.uint8).reshape(-1, 2)
  return np.concatenate([d, m, qs], axis=1).reshape(qt.shape[0], -1)
