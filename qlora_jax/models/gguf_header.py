"""A GGUF file's header: its metadata and where its tensors lie.

`read_gguf` parses the header (not the tensor data) of a llama.cpp GGUF
file, version 2 or 3, into a `GGUFFile`: metadata values decoded as
`gguf.GGUFReader`'s `ReaderField.contents()` decodes them, and each
tensor's type, dimensions (innermost first, as stored), offset and byte
count, checked against the file's size.
"""

import dataclasses
import functools
import mmap
import pathlib
import struct
import types
from collections.abc import Mapping
from typing import Any

import numpy as np
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

from qlora_jax.models import gguf_layout
from qlora_jax.models.safetensors_reader import CheckpointError


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
    if arch not in gguf_layout.ARCHITECTURES:
      raise CheckpointError(
        f"{self.path}: metadata key 'general.architecture' is {arch!r}: "
        f"supported architectures are {sorted(gguf_layout.ARCHITECTURES)}"
      )
    return arch


# GGUF value types (gguf.GGUFValueType): numpy dtypes of the fixed-size ones.
_SCALARS = {
  0: np.uint8,
  1: np.int8,
  2: np.uint16,
  3: np.int16,
  4: np.uint32,
  5: np.int32,
  6: np.float32,
  7: np.bool_,
  10: np.uint64,
  11: np.int64,
  12: np.float64,
}
_STRING, _ARRAY = 8, 9


class _Header:
  """A cursor over a GGUF file's header (mapped, little-endian).

  Parses what `gguf.GGUFReader` parses, with values decoded as its
  `ReaderField.contents()` decodes them, but an array of numbers at once
  and strings in one pass: a 262,144-piece vocabulary (Gemma 3) takes a
  fraction of a second instead of half a minute.
  """

  def __init__(self, data: mmap.mmap):
    self.data, self.pos = data, 0

  def take(self, fmt: str) -> tuple:
    values = struct.unpack_from("<" + fmt, self.data, self.pos)
    self.pos += struct.calcsize("<" + fmt)
    return values

  def string(self) -> str:
    (n,) = self.take("Q")
    raw = self.data[self.pos : self.pos + n]
    if len(raw) != n:
      raise ValueError(
        f"a string of {n} bytes at byte {self.pos} runs past the end"
      )
    self.pos += n
    return raw.decode("utf-8")

  def value(self, kind: int) -> Any:
    if kind == _STRING:
      return self.string()
    if kind == _ARRAY:
      inner, count = self.take("IQ")
      if inner == _STRING:
        return [self.string() for _ in range(count)]
      if inner == _ARRAY:
        return [self.value(self.take("I")[0]) for _ in range(count)]
      dtype = np.dtype(_SCALARS[inner]).newbyteorder("<")
      values = np.frombuffer(self.data, dtype, count, self.pos)
      self.pos += count * dtype.itemsize
      return values.tolist()
    dtype = np.dtype(_SCALARS[kind]).newbyteorder("<")
    (value,) = np.frombuffer(self.data, dtype, 1, self.pos).tolist()
    self.pos += dtype.itemsize
    return value


def _parse(path: pathlib.Path, data: mmap.mmap):
  """(metadata, tensors) of a mapped GGUF file; see `_Header`."""
  h = _Header(data)
  if bytes(data[:4]) != b"GGUF":
    raise ValueError("the file does not start with GGUF")
  h.pos = 4
  version, n_tensors, n_kv = h.take("IQQ")
  if version not in (2, 3):
    raise ValueError(f"GGUF version {version} (2 and 3 are read)")
  metadata = {}
  for _ in range(n_kv):
    key = h.string()
    (kind,) = h.take("I")
    if kind not in _SCALARS and kind not in (_STRING, _ARRAY):
      raise ValueError(f"metadata key {key!r} has unknown value type {kind}")
    metadata[key] = h.value(kind)
  infos = []
  for _ in range(n_tensors):
    name = h.string()
    (n_dims,) = h.take("I")
    dims = h.take("Q" * n_dims)
    raw_type, offset = h.take("IQ")
    infos.append((name, dims, raw_type, offset))
  align = int(metadata.get("general.alignment", 32))
  start = -(-h.pos // align) * align
  tensors = {}
  for name, dims, raw_type, offset in infos:
    what = f"{path}: tensor {name!r}"
    try:
      qtype = GGMLQuantizationType(raw_type)
    except ValueError:
      raise CheckpointError(
        f"{what} has unknown ggml type id {raw_type}"
      ) from None
    block, size = GGML_QUANT_SIZES[qtype]
    if dims and dims[0] % block:
      raise CheckpointError(
        f"{what} has rows of {dims[0]}: not whole {qtype.name} blocks"
      )
    nbytes = int(np.prod(dims, dtype=np.int64)) // block * size
    end = start + offset + nbytes
    if end > len(data):
      raise CheckpointError(
        f"{what} has data ending at byte {end}, but the file has "
        f"{len(data)} bytes (truncated?)"
      )
    tensors[name] = TensorInfo(name, qtype, tuple(dims), start + offset, nbytes)
  return metadata, tensors


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
    with (
      open(path, "rb") as f,
      mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data,
    ):
      metadata, tensors = _parse(path, data)
  except CheckpointError:
    raise
  except (
    ValueError,
    IndexError,
    KeyError,
    OverflowError,
    struct.error,
    UnicodeDecodeError,
  ) as e:
    raise CheckpointError(
      f"{path}: cannot read the GGUF header (truncated or not GGUF?): {e}"
    ) from e
  return GGUFFile(
    path, types.MappingProxyType(metadata), types.MappingProxyType(tensors)
  )
