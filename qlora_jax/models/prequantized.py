"""Checkpoints whose linear weights are stored already quantized.

A Hugging Face folder written by `qlora_jax.interop` with re-quantization
holds, for each quantized weight `W` (shape [out, in], PyTorch's Linear
layout, also for GPT-2's Conv1D), the parts of its QuantizedTensor instead
of a float tensor:

  W.codes    uint8, the packed k-bit codes of the flattened weight
  W.absmax   float32 per block, or uint8 codes with double quantization
  W.absmax2  float32 per group of 256 blocks (double quantization only)
  W.offset   float32 scalar (double quantization only)
  W.minimum  float16 (as quantized) or float32 (after an exact QA-LoRA
             merge) per block, asymmetric data types (`int<k>_asym`) only;
             their W.absmax is the float16 scale d

and config.json has a section

  "qlora_jax_quantization": {
    "format": 1, "data_type": "nf4", "block_size": 64,
    "double_quant": true,
    "tensors": {"model.layers.0.self_attn.q_proj.weight": [64, 64], ...}
  }

naming every quantized weight with its [out, in] shape. Other tensors are
floats as usual. `from_pretrained` reads the parts as they are, so such a
model loads without a float copy of its quantized weights.
"""

import dataclasses
import functools
import json
import pathlib
import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from qlora_jax import nn as qnn
from qlora_jax import quant
from qlora_jax.models.hf_names import Layout
from qlora_jax.models.safetensors_reader import Checkpoint, CheckpointError

SECTION = "qlora_jax_quantization"
FORMAT = 1
PARTS = ("codes", "absmax", "absmax2", "offset", "minimum")


@dataclasses.dataclass(frozen=True)
class Section:
  """The quantization section of a config.json."""

  spec: quant.QuantSpec
  shapes: dict[str, tuple[int, ...]]
  source: str

  def to_dict(self) -> dict[str, Any]:
    return section_dict(self.spec, self.shapes)


def section_dict(spec: quant.QuantSpec, shapes) -> dict[str, Any]:
  return {
    "format": FORMAT,
    "data_type": spec.data_type,
    "block_size": spec.block_size,
    "double_quant": spec.double_quant,
    "tensors": {k: list(v) for k, v in sorted(shapes.items())},
  }


def read_section(config_file: str | pathlib.Path) -> Section | None:
  """The section of a config.json, or None when it has none."""
  raw = json.loads(pathlib.Path(config_file).read_text())
  section = raw.get(SECTION)
  if section is None:
    return None
  where = f"{config_file}: {SECTION}"
  if not isinstance(section, dict) or section.get("format") != FORMAT:
    raise CheckpointError(f"{where}: expected an object with format {FORMAT}")
  try:
    spec = quant.QuantSpec(
      section["data_type"], section["block_size"], section["double_quant"]
    )
    shapes = {
      k: tuple(int(d) for d in v) for k, v in section["tensors"].items()
    }
  except (KeyError, TypeError, ValueError) as e:
    raise CheckpointError(f"{where}: {e!r}") from e
  return Section(spec, shapes, str(config_file))


@functools.lru_cache(maxsize=64)
def _abstract(shape: tuple[int, ...], spec: quant.QuantSpec):
  x = jax.ShapeDtypeStruct(shape, jnp.float32)
  return jax.eval_shape(
    lambda w: quant.quantize(
      w, spec.data_type, spec.block_size, spec.double_quant
    ),
    x,
  )


class QuantizedCheckpoint:
  """A Checkpoint in which each quantized weight reads as one tensor (a
  QuantizedTensor) under its own name; the interface `loading` uses."""

  def __init__(self, ckpt: Checkpoint, section: Section, layout: Layout):
    self.ckpt, self.section, self.layout = ckpt, section, layout
    self.folder = ckpt.folder
    parts = {f"{n}.{p}" for n in section.shapes for p in PARTS}
    for name in section.shapes:
      if f"{name}.codes" not in ckpt.where:
        raise CheckpointError(
          f"{section.source}: {SECTION} names {name!r}, but {ckpt.folder} "
          f"has no tensor {name + '.codes'!r}"
        )
      if name in ckpt.where:
        raise CheckpointError(
          f"{ckpt.folder}: {name!r} is both quantized and a float tensor"
        )
    self.where = {k: p for k, p in ckpt.where.items() if k not in parts}
    for name in section.shapes:
      self.where[name] = ckpt.where[f"{name}.codes"]

  def keys(self) -> list[str]:
    return list(self.where)

  def file(self, key: str) -> pathlib.Path:
    return self.where[key]

  def shape(self, key: str) -> tuple[int, ...]:
    """The float shape as the HF file would store it."""
    if key not in self.section.shapes:
      return self.ckpt.shape(key)
    shape = self.section.shapes[key]
    transposed = self.layout.is_transposed(self.layout.canonical(key))
    return shape[::-1] if transposed else shape

  def read(self, key: str):
    """A float array, or the QuantizedTensor of a quantized weight."""
    if key not in self.section.shapes:
      return self.ckpt.read(key)
    spec, shape = self.section.spec, self.section.shapes[key]
    want = _abstract(shape, spec)
    arrays = {}
    for part in PARTS:
      expected = getattr(want, part)
      name = f"{key}.{part}"
      if expected is None:
        if name in self.ckpt.where:
          raise CheckpointError(
            f"{self.ckpt.file(name)}: unexpected {name!r} ({SECTION} has "
            "double_quant false)"
          )
        arrays[part] = None
        continue
      if name not in self.ckpt.where:
        raise CheckpointError(f"{self.folder}: missing tensor {name!r}")
      array = self.ckpt.read(name)
      dtypes = {expected.dtype}
      if part == "minimum":  # float32 after an exact merge
        dtypes.add(np.dtype(np.float32))
      if array.shape != expected.shape or array.dtype not in dtypes:
        raise CheckpointError(
          f"tensor {name!r} in {self.ckpt.file(name)} is {array.dtype}"
          f"{list(array.shape)}, but {spec} of {list(shape)} gives "
          f"{expected.dtype}{list(expected.shape)}"
        )
      arrays[part] = array
    return dataclasses.replace(want, **arrays)


def adapter_over(qt: quant.QuantizedTensor, key, lora, base_dtype, name: str):
  """{"weight": qt, adapters...} of a layer whose base is pre-quantized."""
  qt = dataclasses.replace(qt, dtype=jnp.dtype(base_dtype).name)
  if lora is None:
    return {"weight": qt}
  if lora.init not in ("kaiming", "gaussian"):
    raise ValueError(
      f"lora init {lora.init!r} of {name} changes the base weight: it cannot "
      "start from a pre-quantized checkpoint"
    )
  w = np.asarray(quant.dequantize(qt, jnp.float32))
  qspec = qt.spec if lora.qa else None  # QA-LoRA checks the base's blocks
  values = qnn.init_adapter(key, w, lora, qspec, jnp.float32, name)
  values["weight"] = qt
  return values


def quant_targets(section: Section, targets: dict, layout: Layout) -> dict:
  """make_plan's `quant` mapping selecting exactly the quantized weights.

  Args:
    section: the config's section.
    targets: `loading.targets(spec, scan_layers)` (by canonical name).
    layout: the model's checkpoint naming.
  """
  paths: dict[str, set] = {}
  for name in section.shapes:
    t = targets.get(layout.canonical(name))
    if t is None or t.dest[-1] != "weight":
      raise CheckpointError(
        f"{section.source}: {SECTION} names {name!r}, which is not a linear "
        "weight of the model"
      )
    if tuple(t.shape) != section.shapes[name]:
      raise CheckpointError(
        f"{section.source}: {SECTION} gives {name!r} shape "
        f"{list(section.shapes[name])}, the model {list(t.shape)}"
      )
    paths.setdefault("/".join(t.dest[:-1]), set()).add(t.layer)
  for path, layers in paths.items():
    dest = (*path.split("/"), "weight")
    every = {t.layer for t in targets.values() if t.dest == dest}
    if layers != every:
      raise CheckpointError(
        f"{section.source}: only some layers of {path} are quantized; "
        "load with scan_layers=False"
      )
  regex = "^(" + "|".join(re.escape(p) for p in sorted(paths)) + ")$"
  s = section.spec
  return {
    "data_type": s.data_type,
    "block_size": s.block_size,
    "double_quant": s.double_quant,
    "targets": regex,
  }
