"""Reads a Hugging Face checkpoint folder's safetensors, tensor by tensor.

A folder holds `model.safetensors`, or shards listed by
`model.safetensors.index.json` (its "weight_map": tensor name -> file).
Files are memory-mapped by `safetensors`; a tensor is copied into host
memory only when it is read.
"""

import json
import pathlib

import numpy as np
from safetensors import safe_open

SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"


class CheckpointError(ValueError):
  """A checkpoint that does not match the model; names tensor and file."""


def is_float(dtype) -> bool:
  return np.dtype(dtype).kind == "f" or np.dtype(dtype).name == "bfloat16"


def _check_finite(array: np.ndarray, what: str, chunk: int = 1 << 20) -> None:
  """Raises on NaN / inf; checks in chunks to keep no large temporary."""
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
  checkpoint.
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
    try:
      with safe_open(str(path), framework="numpy") as f:
        keys = list(f.keys())
        for key in keys:
          self._shapes[key] = tuple(f.get_slice(key).get_shape())
    except Exception as e:  # safetensors raises its own error types
      raise CheckpointError(f"{path}: cannot read safetensors: {e}") from e
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

  def read(self, key: str) -> np.ndarray:
    """The tensor `key` in host memory; floats are checked to be finite."""
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
    if is_float(array.dtype):
      _check_finite(array, f"tensor {key!r} in {path}")
    return array
