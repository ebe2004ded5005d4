"""Merged models out to GGUF files, llama.cpp's format.

`write_gguf` writes the tensors of a Llama-family model (transformers'
names and layouts, as `hf_export.merged_tensors` gives them) as one GGUF
file that llama.cpp, transformers (`gguf_file=`) and our own reader load:

- the metadata of the base GGUF file (architecture, hyperparameters,
  tokenizer vocabulary and merges, special tokens, chat template) copied
  key by key with its stored types; `general.file_type` gives the type
  most matrices have;
- tensors under llama.cpp's names, q/k rows put back in llama.cpp's rotary
  order (`gguf_layout.permute_rows`); the base's LongRoPE factor tensors
  (Phi-3-128k) copied as they are;
- matrices in the chosen type: F32, F16, BF16 or Q8_0 (converted by the
  `gguf` package's own NumPy quantizer, as llama.cpp's converter does);
  norms and biases in F32, as llama.cpp keeps them;
- a QuantizedTensor in int4_asym blocks of 32 (a QA-LoRA merge, or a base
  loaded from Q4_1) as Q4_1 blocks, its codes and scales as they are (a
  float32 minimum rounded to float16, the format's type); other quantized
  weights dequantized and written in the chosen type; a `RawTensor` (GGML
  blocks made elsewhere) as it is.

The header and tensor table are written first, then one tensor at a time,
each encoded just before it is written. The file is written where it is
asked to be: a run's export writes it into `engine.outputs`' temporary,
which appears under its name only when complete.
"""

import collections
import dataclasses
import pathlib
from collections.abc import Mapping

import gguf
import numpy as np
from gguf.constants import GGML_QUANT_SIZES, GGUFValueType
from gguf.constants import GGMLQuantizationType as Q

from qlora_jax import quant
from qlora_jax.interop.chat_template import EOT_KEY, TEMPLATE_KEY, RunTemplate
from qlora_jax.models import gguf_layout, gguf_q4_1, gguf_reader

TYPES = {"float32": Q.F32, "float16": Q.F16, "bfloat16": Q.BF16, "q8_0": Q.Q8_0}
# llama.cpp's LlamaFileType of a file whose matrices are mostly of a type.
FILE_TYPES = {Q.F32: 0, Q.F16: 1, Q.Q4_0: 2, Q.Q4_1: 3, Q.Q8_0: 7, Q.BF16: 32}
# Keys the writer sets itself, or that describe the file rather than the model.
_NOT_COPIED = {"general.architecture", "general.file_type", "general.alignment"}


@dataclasses.dataclass(frozen=True)
class RawTensor:
  """A tensor already in GGML blocks.

  Attributes:
    qtype: its GGML type (e.g. Q4_1).
    data: uint8 [rows, bytes per row], rows in Hugging Face order.
    shape: the Hugging Face shape [rows, columns] of the values.
  """

  qtype: Q
  data: np.ndarray
  shape: tuple[int, ...]


def _stored_type(key: str, value, qtype: Q) -> Q:
  if isinstance(value, RawTensor):
    return value.qtype
  if np.ndim(value) < 2:
    return Q.F32
  block, _ = GGML_QUANT_SIZES[qtype]
  if value.shape[-1] % block:
    raise ValueError(
      f"tensor {key!r}: rows of {value.shape[-1]} are not whole {qtype.name} "
      f"blocks of {block}; choose another --dtype"
    )
  return qtype


def _info(value, qtype: Q) -> tuple[tuple[int, ...], np.dtype, int]:
  """(shape as given to the writer, its dtype, bytes) of a stored tensor."""
  shape = tuple(value.shape)
  if qtype in (Q.F32, Q.F16):
    dtype = np.dtype(np.float32 if qtype == Q.F32 else np.float16)
    return shape, dtype, int(np.prod(shape)) * dtype.itemsize
  byte_shape = gguf.quant_shape_to_byte_shape(shape, qtype)
  return byte_shape, np.dtype(np.uint8), int(np.prod(byte_shape))


def _encode(value, qtype: Q, heads: int | None) -> np.ndarray:
  """The bytes (or F32/F16 values) of one tensor, rows in llama.cpp order."""
  if isinstance(value, RawTensor):
    data = value.data
  elif qtype == Q.F32:
    data = np.ascontiguousarray(value, np.float32)
  elif qtype == Q.F16:
    data = np.asarray(value, np.float32).astype(np.float16)
  else:
    data = gguf.quants.quantize(np.asarray(value, np.float32), qtype)
  if heads:
    data = gguf_layout.permute_rows(data, heads)
  return np.ascontiguousarray(data)


def _copy_metadata(
  reader: gguf.GGUFReader,
  writer: gguf.GGUFWriter,
  skip: frozenset = frozenset(),
) -> None:
  for key, field in reader.fields.items():
    if key.startswith("GGUF.") or key in _NOT_COPIED or key in skip:
      continue
    vtype = field.types[0]
    sub = field.types[-1] if vtype == GGUFValueType.ARRAY else None
    writer.add_key_value(key, field.contents(), vtype, sub)


def write_gguf(
  path: str | pathlib.Path,
  tensors: Mapping[str, "np.ndarray | RawTensor"],
  base: str | pathlib.Path,
  dtype: str = "float32",
  template: RunTemplate | None = None,
) -> pathlib.Path:
  """Writes `tensors` (HF names) as the GGUF file `path`, with the metadata
  of the GGUF file `base` (the model they were trained from); `template`,
  the run's chat template, replaces the base's.

  Raises:
    ValueError: an unknown `dtype`, a tensor with no GGUF name or of a
      shape the base's metadata does not give, rows that are not whole
      blocks of the type.
    CheckpointError: `base` is not a readable GGUF file of a supported
      architecture.
  """
  if dtype not in TYPES:
    raise ValueError(f"--dtype: {dtype!r}, expected one of {list(TYPES)}")
  qtype = TYPES[dtype]
  base_file = gguf_reader.read_gguf(base)
  config = gguf_reader.gguf_config(base_file)
  arch = base_file.architecture
  plan = []  # (gguf name, value, stored type, heads)
  for key, value in tensors.items():
    if isinstance(value, quant.QuantizedTensor):
      if value.spec == gguf_q4_1.Q4_1_SPEC and value.ndim == 2:
        raw = gguf_q4_1.quantized_to_q4_1(value)
        value = RawTensor(Q.Q4_1, raw, tuple(value.shape))
      else:
        value = np.asarray(quant.dequantize(value, np.float32))
    try:
      name = gguf_layout.gguf_name(key, arch)
    except KeyError as e:
      raise ValueError(str(e.args[0])) from None
    shift = gguf_layout.norm_shift(arch, key)
    if shift:  # llama.cpp scales Gemma's norms by the stored weight
      value = np.asarray(value, np.float32) + np.float32(shift)
    want = gguf_layout.expected_shape(key, config)
    if want is not None and tuple(value.shape) != want:
      raise ValueError(
        f"tensor {key!r} has shape {tuple(value.shape)}, but {base} "
        f"gives {want}"
      )
    kind = _stored_type(key, value, qtype)
    plan.append(
      (name, value, kind, gguf_layout.permuted_heads(arch, key, config))
    )
  for name, value in gguf_reader.rope_factors(base_file).items():
    plan.append((name, value, Q.F32, None))  # LongRoPE's, as they are
  matrices = collections.Counter(k for _, v, k, _ in plan if len(v.shape) == 2)
  path = pathlib.Path(path)
  writer = gguf.GGUFWriter(str(path), arch)
  if template is None:
    _copy_metadata(gguf.GGUFReader(base), writer)
  else:
    skip = frozenset({TEMPLATE_KEY, EOT_KEY})
    _copy_metadata(gguf.GGUFReader(base), writer, skip)
    if template.text is not None:
      writer.add_chat_template(template.text)
    if template.end_of_turn_id is not None:
      writer.add_eot_token_id(template.end_of_turn_id)
  if matrices and matrices.most_common(1)[0][0] in FILE_TYPES:
    writer.add_file_type(FILE_TYPES[matrices.most_common(1)[0][0]])
  for name, value, kind, _ in plan:
    shape, stored, nbytes = _info(value, kind)
    raw = None if kind in (Q.F32, Q.F16) else kind
    writer.add_tensor_info(name, shape, stored, nbytes, raw_dtype=raw)
  try:
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for _, value, kind, heads in plan:
      writer.write_tensor_data(_encode(value, kind, heads))
  finally:
    writer.close()
  return path
