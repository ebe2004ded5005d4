"""Reads a Hugging Face checkpoint folder's safetensors, tensor by tensor.

A folder holds `model.safetensors`, or shards listed by
`model.safetensors.index.json` (its "weight_map": tensor name -> file).
Files are memory-mapped by `safetensors`; a tensor is copied into host
memory only when it is read.
"""

import json
import os
import pathlib
import struct

import jax
import jax.numpy as jnp
import numpy as np
from safetensors import safe_open

SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"


class CheckpointError(ValueError):
  """A checkpoint that does not match the model; names tensor and file."""


def is_float(dtype) -> bool:
  return np.dtype(dtype).kind == "f" or np.dtype(dtype).name == "bfloat16"


@jax.jit
def _all_finite(x: jax.Array) -> jax.Array:
  return jnp.isfinite(x).all()


def check_finite(array: np.ndarray, what: str, chunk: int = 1 << 20) -> None:
  """Raises on NaN / inf, naming the first bad index.

  The check runs in XLA (on every core, with no float32 temporary of a
  bfloat16 tensor); only a tensor that fails is searched, in chunks.
  """
  if bool(_all_finite(jnp.asarray(array))):
    return
  flat = array.reshape(-1)
  for start in range(0, flat.size, chunk):
    finite = np.isfinite(flat[start : start + chunk])
    if not finite.all():
      bad = np.unravel_index(start + int(np.argmin(finite)), array.shape)
      raise CheckpointError(
        f"{what} has a non-finite value at index {tuple(int(i) for i in bad)}"
      )


class Checkpoint:
  """The tensors of one checkpoint folder.

  Names and shapes are read from the file headers up front. Each read
  opens its file anew: a handle kept open would keep every page it has
  read mapped, and the process's resident memory would grow to the whole
  checkpoint. `prefetch` asks the kernel to start reading a tensor's bytes
  from disk in the background, so that a loader can overlap the disk with
  its work on the tensor before.
  """

  def __init__(self, folder: str | pathlib.Path):
    self.folder = pathlib.Path(folder)
    index = self.folder / INDEX
    single = self.folder / SINGLE
    if index.is_file():
      self.where = self._read_index(index)
    elif single.is_file():
      self.where = {k: single for k in self._headers(single)}
    else:
      raise CheckpointError(
        f"no {SINGLE} or {INDEX} in {self.folder} (only safetensors "
        "checkpoints are supported)"
      )

  def _headers(self, path: pathlib.Path) -> list[str]:
    """Reads one file's names and shapes into `self._shapes`."""
    if not hasattr(self, "_shapes"):
      self._shapes: dict[str, tuple[int, ...]] = {}
      self._spans: dict[str, tuple[int, int]] = {}
    try:
      with safe_open(str(path), framework="numpy") as f:
        keys = list(f.keys())
        for key in keys:
          self._shapes[key] = tuple(f.get_slice(key).get_shape())
    except Exception as e:  # safetensors raises its own error types
      raise CheckpointError(f"{path}: cannot read safetensors: {e}") from e
    self._spans.update(_byte_spans(path))
    return keys

  def _read_index(self, index: pathlib.Path) -> dict[str, pathlib.Path]:
    try:
      weight_map = json.loads(index.read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
      raise CheckpointError(f"{index}: not a safetensors index: {e}") from e
    where = {}
    for key, name in weight_map.items():
      path = self.folder / name
      if not path.is_file():
        raise CheckpointError(
          f"{index}: tensor {key!r} is in {name}, which does not exist"
        )
      where[key] = path
    for path in sorted(set(where.values())):
      in_file = set(self._headers(path))
      for key in (k for k, p in where.items() if p == path):
        if key not in in_file:
          raise CheckpointError(
            f"{index}: tensor {key!r} is listed in {path.name} but the file "
            "does not hold it"
          )
    return where

  def keys(self) -> list[str]:
    return list(self.where)

  def file(self, key: str) -> pathlib.Path:
    return self.where[key]

  def shape(self, key: str) -> tuple[int, ...]:
    return self._shapes[key]

  def prefetch(self, key: str) -> None:
    """Starts reading tensor `key` into the page cache (no-op where the
    platform has no `posix_fadvise`)."""
    span = self._spans.get(key)
    if span is None or not hasattr(os, "posix_fadvise"):
      return
    fd = os.open(self.where[key], os.O_RDONLY)
    try:
      os.posix_fadvise(fd, span[0], span[1], os.POSIX_FADV_WILLNEED)
    finally:
      os.close(fd)

  def read(self, key: str) -> np.ndarray:
    """The tensor `key` in host memory; floats are checked to be finite."""
    array = self.read_unchecked(key)
    if is_float(array.dtype):
      check_finite(array, self.what(key))
    return array

  def what(self, key: str) -> str:
    """How errors name tensor `key`."""
    return f"tensor {key!r} in {self.where[key]}"

  def read_unchecked(self, key: str) -> np.ndarray:
    """The tensor `key`, its values not checked (for a caller that checks
    them in a pass of its own, as the quantizer does)."""
    path = self.where[key]
    try:
      with safe_open(str(path), framework="numpy") as f:
        array = f.get_tensor(key)
    except Exception as e:
      raise CheckpointError(f"tensor {key!r} in {path}: {e}") from e
    if not (is_float(array.dtype) or np.issubdtype(array.dtype, np.integer)):
      raise CheckpointError(
        f"tensor {key!r} in {path} has unsupported dtype {array.dtype}"
      )
    return array


def _byte_spans(path: pathlib.Path) -> dict[str, tuple[int, int]]:
  """{tensor: (file offset, length)} from a safetensors header (an 8-byte
  little-endian header size, a JSON header, then the data; offsets in the
  header count from the data's start)."""
  with open(path, "rb") as f:
    (size,) = struct.unpack("<Q", f.read(8))
    header = json.loads(f.read(size))
  start = 8 + size
  return {
    k: (
      start + v["data_offsets"][0],
      v["data_offsets"][1] - v["data_offsets"][0],
    )
    for k, v in header.items()
    if k != "__metadata__"
  }
