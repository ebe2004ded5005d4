"""Checkpoint tensors into model variables, quantized as they are read.

Every frozen variable of the model has one checkpoint tensor (see
`hf_names`). The whole name/shape correspondence is checked before any
tensor is read. Then tensors are read one at a time: a linear weight goes
through `qlora_jax.nn.init_adapter` (quantized per the plan, adapters
created from it), anything else is cast to the base dtype. With scanned
layers each stacked variable is filled layer by layer into one
preallocated host buffer and handed to `place` when complete, so host
memory holds the stored model plus about one float tensor.
"""

import dataclasses
import re
import zlib
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from qlora_jax import nn as qnn
from qlora_jax import quant
from qlora_jax.models import prequantized
from qlora_jax.models.hf_names import Layout
from qlora_jax.models.layers import Options
from qlora_jax.models.registry import ModelSpec
from qlora_jax.models.safetensors_reader import (
  Checkpoint,
  CheckpointError,
  check_finite,
  is_float,
)

Place = Callable[[str, Any], Any]
Path = tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class Target:
  """One frozen variable of the unscanned model and where it is stored.

  Attributes:
    name: the checkpoint tensor name, in the model's naming.
    shape: the variable's shape (for one layer).
    dest: its path in the "base" collection of the built model.
    layer: its index on the stacked axis (scanned layers), else None.
  """

  name: str
  shape: tuple[int, ...]
  dest: Path
  layer: int | None


@dataclasses.dataclass
class LoadStats:
  """What loading read and stored (bytes of frozen variables)."""

  num_tensors: int = 0
  num_ignored: int = 0
  base_float32_bytes: int = 0
  base_stored_bytes: int = 0
  linear_float32_bytes: int = 0
  linear_stored_bytes: int = 0
  peak_rss_bytes: int = 0
  peak_rss_before_bytes: int = 0
  seconds: float = 0.0

  @property
  def linear_ratio(self) -> float:
    """Stored / float32 bytes of the linear weights."""
    return self.linear_stored_bytes / max(self.linear_float32_bytes, 1)


def _destination(path: Path, blocks: str, scan: bool):
  if scan:
    for i, part in enumerate(path):
      m = re.fullmatch(rf"{blocks}_(\d+)", part)
      if m:
        return path[:i] + (blocks,) + path[i + 1 :], int(m.group(1))
  return path, None


def targets(spec: ModelSpec, scan_layers: bool) -> dict[str, Target]:
  """Every frozen variable by checkpoint name (from abstract shapes)."""
  shapes = spec.abstract_variables(Options())[qnn.BASE]
  layout = spec.layout
  out = {}
  for path, leaf in qnn.flatten(shapes).items():
    name = layout.hf_name(path)
    dest, layer = _destination(path, layout.blocks, scan_layers)
    out[name] = Target(name, tuple(leaf.shape), dest, layer)
  return out


def _preview(names, n: int = 5) -> str:
  names = sorted(names)
  more = f" and {len(names) - n} more" if len(names) > n else ""
  return ", ".join(repr(k) for k in names[:n]) + more


def match(
  ckpt: Checkpoint, layout: Layout, wanted: dict[str, Target], source: str
) -> tuple[dict[str, str], list[str]]:
  """Checkpoint key of every target, after checking names and shapes.

  Returns:
    ({target name: checkpoint key}, ignored checkpoint keys).

  Raises:
    CheckpointError: a missing, unexpected or duplicated tensor, or a
      shape that disagrees with the config `source`.
  """
  found: dict[str, str] = {}
  ignored = []
  for key in ckpt.keys():
    if layout.is_ignored(key):
      ignored.append(key)
      continue
    name = layout.canonical(key)
    if name in found:
      raise CheckpointError(
        f"tensors {found[name]!r} ({ckpt.file(found[name])}) and {key!r} "
        f"({ckpt.file(key)}) are the same variable {name!r}"
      )
    found[name] = key
  unexpected = [k for n, k in found.items() if n not in wanted]
  if unexpected:
    files = sorted({str(ckpt.file(k)) for k in unexpected})
    raise CheckpointError(
      f"unexpected tensor(s) {_preview(unexpected)} in {', '.join(files)}: "
      f"the model built from {source} has no such variable"
    )
  missing = [n for n in wanted if n not in found]
  if missing:
    files = ", ".join(sorted({p.name for p in ckpt.where.values()}))
    raise CheckpointError(
      f"missing tensor(s) {_preview(missing)} in the checkpoint "
      f"{ckpt.folder} ({files}); the model built from {source} needs them"
    )
  for name, t in wanted.items():
    key = found[name]
    shape = ckpt.shape(key)
    if layout.is_transposed(name):
      shape = shape[::-1]
    if shape != t.shape:
      note = (
        " after transposing [in, out]" if layout.is_transposed(name) else ""
      )
      raise CheckpointError(
        f"tensor {key!r} in {ckpt.file(key)} has shape {shape}{note}, but "
        f"{source} gives {t.shape}"
      )
  return {n: found[n] for n in wanted}, ignored


class _Stack:
  """Per-layer values of one stacked variable, filled into host buffers."""

  def __init__(self, num_layers: int):
    self.num_layers = num_layers
    self.buffers: dict[Path, Any] = {}

  def put(self, path: Path, layer: int, value) -> None:
    if path not in self.buffers:
      self.buffers[path] = jax.tree.map(
        lambda a: np.empty((self.num_layers, *a.shape), a.dtype), value
      )

    def fill(buffer, a):
      buffer[layer] = np.asarray(a)

    jax.tree.map(fill, self.buffers[path], value)


def _nbytes(value) -> int:
  return sum(
    int(np.prod(a.shape)) * a.dtype.itemsize for a in jax.tree.leaves(value)
  )


def _layer_key(root: jax.Array, module: str, layer: int | None) -> jax.Array:
  key = jax.random.fold_in(root, zlib.crc32(module.encode()))
  return jax.random.fold_in(key, layer or 0)


def default_place(path: str, leaf):
  """Puts a leaf on the default device."""
  del path
  return jax.tree.map(jnp.asarray, leaf)


def read_variables(
  ckpt: Checkpoint,
  spec: ModelSpec,
  opts: Options,
  source: str,
  seed: int = 0,
  place: Place | None = None,
) -> tuple[dict[Path, Any], LoadStats]:
  """Flat {(collection, *path): value} of every checkpoint variable.

  Linear weights are quantized and given adapters per `opts.plan`; the
  adapters' random inits use keys derived from `seed`, the module path and
  the layer index (so scanned and unscanned models get different draws).
  """
  place = place or default_place
  layout = spec.layout
  wanted = targets(spec, opts.scan_layers)
  keys, ignored = match(ckpt, layout, wanted, source)
  stats = LoadStats(num_tensors=len(keys), num_ignored=len(ignored))
  groups: dict[Path, list[Target]] = {}
  for t in wanted.values():
    groups.setdefault(t.dest, []).append(t)
  root = jax.random.key(seed)
  out: dict[Path, Any] = {}
  order = [
    sorted(group, key=lambda t: t.layer or 0) for group in groups.values()
  ]
  upcoming = iter([keys[t.name] for group in order for t in group][1:])
  prefetch = getattr(ckpt, "prefetch", lambda key: None)
  for dest, group in zip(groups, order, strict=True):
    stack = _Stack(len(group)) if group[0].layer is not None else None
    for t in group:
      raw = array = _read(ckpt, keys[t.name], t, opts)
      following = next(upcoming, None)
      if following is not None:
        prefetch(following)  # the disk reads it while this one converts
      prequantized = isinstance(array, quant.QuantizedTensor)
      if not prequantized and not is_float(array.dtype):
        raise CheckpointError(
          f"tensor {keys[t.name]!r} in {ckpt.file(keys[t.name])} is "
          f"{array.dtype}, but {'/'.join(dest)} is a floating-point weight"
        )
      if dest[-1] == "weight" and not prequantized:
        # Casts, transpose and quantization run in XLA on every core.
        array = jnp.asarray(array)
      if layout.is_transposed(t.name) and not prequantized:
        array = array.T if isinstance(array, jax.Array) else array.T.copy()
      try:
        values = _convert(array, t, dest, opts, root)
      except quant.NonFiniteError:
        if hasattr(ckpt, "what"):  # a bad stored value: name the file
          check_finite(raw, ckpt.what(keys[t.name]))
        raise  # finite as stored, not after the cast to the base dtype
      for path, value in values.items():
        if path[0] == qnn.BASE:
          stored = _nbytes(value)
          stats.base_float32_bytes += 4 * array.size
          stats.base_stored_bytes += stored
          if dest[-1] == "weight":
            stats.linear_float32_bytes += 4 * array.size
            stats.linear_stored_bytes += stored
        if stack is None:
          out[path] = place("/".join(path), value)
        else:
          stack.put(path, t.layer, value)
      del raw, array, values
    if stack is not None:
      for path, value in stack.buffers.items():
        out[path] = place("/".join(path), value)
  return out, stats


def _read(ckpt, key: str, t: Target, opts: Options):
  """The tensor `key`: taken as stored when the checkpoint holds a linear
  weight already in its layer's quantized layout (a GGUF Q4_1 matrix for
  int4_asym in blocks of 32), else as floats. A weight to be quantized is
  not checked for NaN / inf here: the quantizer checks it in its own pass
  (and `read_variables` turns its error into one naming the file)."""
  if t.dest[-1] != "weight":
    return ckpt.read(key)
  qspec = opts.plan.lookup("/".join(t.dest[:-1])).quant
  read_quantized = getattr(ckpt, "read_quantized", None)
  if read_quantized is not None:
    qt = read_quantized(key, qspec)
    if qt is not None:
      return qt
  if qspec is not None and hasattr(ckpt, "read_unchecked"):
    return ckpt.read_unchecked(key)
  return ckpt.read(key)


def _convert(array, t: Target, dest: Path, opts: Options, root):
  """{(collection, *path): value} for one layer's tensor."""
  if dest[-1] != "weight":  # embeddings, norms, biases
    dtype = opts.embedding_dtype if dest[-1] == "embedding" else opts.base_dtype
    return {(qnn.BASE, *dest): array.astype(dtype, copy=False)}
  module = "/".join(dest[:-1])
  name = module if t.layer is None else f"{module}[{t.layer}]"
  layer_spec = opts.plan.lookup(module)
  key = _layer_key(root, module, t.layer)
  if isinstance(array, quant.QuantizedTensor):  # stored quantized
    values = prequantized.adapter_over(
      array, key, layer_spec.lora, opts.base_dtype, name
    )
  else:
    values = qnn.init_adapter(
      key, array, layer_spec.lora, layer_spec.quant, opts.base_dtype, name
    )
  return {
    (qnn.BASE if k == "weight" else qnn.PARAMS, *dest[:-1], k): v
    for k, v in values.items()
  }
