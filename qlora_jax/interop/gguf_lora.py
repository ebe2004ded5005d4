"""Adapters out to llama.cpp's LoRA GGUF format.

llama.cpp applies a LoRA GGUF file over the base GGUF file at load time
(`llama_adapter_lora_init` in src/llama-adapter.cpp), so a quantized base
ships once and each adapter is a small file. The file holds what that
loader reads and what llama.cpp's `convert_lora_to_gguf.py` writes:

- metadata `general.architecture` (the base file's; llama.cpp refuses
  another), `general.type = "adapter"`, `adapter.type = "lora"` and
  `adapter.lora.alpha` (float32);
- for each adapted matrix `blk.N.<tensor>.weight` of the base file, the
  pair `blk.N.<tensor>.weight.lora_a`, PEFT's lora_A [r, in] (GGML
  dimensions [in, r]), and `.lora_b`, PEFT's lora_B [out, r].

llama.cpp adds `alpha / r * lora_b @ (lora_a @ x)` to the base's product,
r read per matrix from lora_b (`build_lora_mm` in src/llama-graph.cpp, at
the default user scale 1). The file has one alpha: the one that makes
alpha / r the scale of most adapters (alpha itself for plain LoRA,
alpha * sqrt(r) for rsLoRA of one rank); an adapter whose own scale
differs (alpha_pattern, mixed ranks under rsLoRA) has the ratio folded into
its lora_b. The rows of q_proj and k_proj are outputs, so lora_b's rows of
those go into llama.cpp's rotary order as the base's rows do
(`gguf_layout.permute_rows`, `llama` only). A QA-LoRA A [in / L, r] over
block means is written as the [in, r] A that computes the same (each row
repeated L times over L).

What llama.cpp's LoRA cannot carry is refused, naming it: DoRA magnitudes,
trained base variables (norms, biases, whole layers) and new heads,
adapters trained against a changed base (PiSSA, LoftQ: the base holds a
residual), an adapter on a matrix the base file lacks (the head of a model
with tied embeddings). The merged export (`interop.gguf_export`) writes
each of those models.

Matrices are F32, F16, BF16 or Q8_0; one whose rows are not whole Q8_0
blocks of 32 (lora_b's rows hold r values) is F16, as the converter falls
back.
"""

import collections
import math
import pathlib
from collections.abc import Mapping
from typing import Any, NamedTuple

import gguf
import numpy as np
from gguf.constants import GGMLQuantizationType as Q

from qlora_jax import models
from qlora_jax import nn as qnn
from qlora_jax.interop import gguf_export, peft
from qlora_jax.interop.naming import Names
from qlora_jax.models import gguf_layout

REMEDY = "export the merged model instead (--gguf)"
# Inits whose adapters apply to the unmodified base.
PLAIN_INITS = ("kaiming", "gaussian")


class LoraPair(NamedTuple):
  """One adapted matrix: lora_a [r, in] and lora_b [out, r] as llama.cpp
  reads them (lora_b scaled and permuted)."""

  a: np.ndarray
  b: np.ndarray


def file_alpha(lora: qnn.LoraSpec) -> float:
  """The alpha that makes llama.cpp's alpha / r this adapter's scale."""
  return float(lora.alpha) * (math.sqrt(lora.rank) if lora.rslora else 1.0)


def _check_trainable(trainable: Mapping[str, Any], plan: qnn.Plan) -> None:
  """Raises unless the trainable tree is LoRA pairs that llama.cpp applies."""
  adapters = set()
  for path in plan.lora_paths():
    lora = plan.lookup(path).lora
    if lora.dora:
      raise ValueError(
        f"layer {path} is DoRA: llama.cpp's LoRA adds lora_b @ lora_a and "
        f"cannot rescale the merged weight per output; {REMEDY}"
      )
    if lora.init not in PLAIN_INITS:
      raise ValueError(
        f"layer {path} has lora init {lora.init!r}, which trains against a "
        f"changed base (the base holds a residual), so the adapter does not "
        f"apply to the base file; {REMEDY}"
      )
    keys = (qnn.PARAMS, *path.split("/"))
    adapters |= {(*keys, "lora_a"), (*keys, "lora_b")}
  other = sorted(
    "/".join(p) for p in qnn.flatten(trainable) if p not in adapters
  )
  if other:
    raise ValueError(
      f"the run trains {len(other)} variables besides LoRA pairs "
      f"({', '.join(other[:4])}{', ...' if len(other) > 4 else ''}): a "
      f"llama.cpp LoRA file holds only lora_a / lora_b; {REMEDY}"
    )
  if not adapters:
    raise ValueError("the run has no LoRA adapters to export")


def lora_pairs(
  trainable: Mapping[str, Any],
  plan: qnn.Plan,
  spec: models.ModelSpec,
  scan_layers: bool,
  base: "str | pathlib.Path",
) -> tuple[float, dict[str, LoraPair]]:
  """(alpha, {base GGUF tensor name: its pair}) of a run's adapters over
  the GGUF file `base`, such that llama.cpp's alpha / r * lora_b @ lora_a
  is each layer's scale * (lora_a @ lora_b).T.

  Raises:
    ValueError: an adapter llama.cpp cannot apply (see the module doc).
  """
  _check_trainable(trainable, plan)
  base_file = models.read_gguf(base)
  arch, config = base_file.architecture, models.gguf_config(base_file)
  names = Names(spec, scan_layers)
  tensors, specs, _ = peft.adapter_tensors(trainable, plan, names)
  alphas = collections.Counter(file_alpha(s) for s in specs.values())
  alpha = alphas.most_common(1)[0][0]
  pairs = {}
  for module, lora in specs.items():
    key = module + ".weight"
    name = gguf_layout.gguf_name(key, arch)
    if name not in base_file.tensors:
      raise ValueError(
        f"{module} has an adapter, but {base} has no tensor {name} for "
        f"llama.cpp to apply it to (a head tied to the embeddings); {REMEDY}"
      )
    a = tensors[peft.PREFIX + module + peft.LORA_KEYS["lora_a"]]
    b = tensors[peft.PREFIX + module + peft.LORA_KEYS["lora_b"]]
    if file_alpha(lora) != alpha:
      b = (b.astype(np.float64) * (file_alpha(lora) / alpha)).astype(np.float32)
    heads = gguf_layout.permuted_heads(arch, key, config)
    if heads:
      b = gguf_layout.permute_rows(b, heads)
    pairs[name] = LoraPair(a, np.ascontiguousarray(b))
  return float(alpha), pairs


def _encoded(value: np.ndarray, qtype: Q) -> tuple[np.ndarray, Q]:
  """(data for GGUFWriter.add_tensor, its type): Q8_0 falls back to F16
  for rows that are not whole blocks."""
  if qtype == Q.Q8_0 and value.shape[-1] % gguf.GGML_QUANT_SIZES[Q.Q8_0][0]:
    qtype = Q.F16
  return gguf.quants.quantize(np.asarray(value, np.float32), qtype), qtype


def write_gguf_lora(
  path: "str | pathlib.Path",
  trainable: Mapping[str, Any],
  plan: qnn.Plan,
  spec: models.ModelSpec,
  scan_layers: bool,
  base: "str | pathlib.Path",
  dtype: str = "float32",
) -> dict[str, Any]:
  """Writes the run's adapters as a llama.cpp LoRA GGUF file `path` over
  the GGUF file `base`; returns {"alpha", "tensors", "types"}.

  Raises:
    ValueError: an unknown `dtype`, or an adapter llama.cpp cannot apply.
    CheckpointError: `base` is not a readable GGUF file of a supported
      architecture.
  """
  if dtype not in gguf_export.TYPES:
    raise ValueError(
      f"--dtype: {dtype!r}, expected one of {list(gguf_export.TYPES)}"
    )
  qtype = gguf_export.TYPES[dtype]
  alpha, pairs = lora_pairs(trainable, plan, spec, scan_layers, base)
  writer = gguf.GGUFWriter(str(path), models.read_gguf(base).architecture)
  writer.add_type(gguf.GGUFType.ADAPTER)
  writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
  writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
  writer.add_file_type(gguf_export.FILE_TYPES[qtype])
  types = collections.Counter()
  for name, pair in sorted(pairs.items()):
    for suffix, value in ((".lora_a", pair.a), (".lora_b", pair.b)):
      data, kind = _encoded(value, qtype)
      raw = kind if data.dtype == np.uint8 else None
      writer.add_tensor(name + suffix, data, raw_dtype=raw)
      types[kind.name] += 1
  try:
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
  finally:
    writer.close()
  return {"alpha": alpha, "tensors": 2 * len(pairs), "types": dict(types)}
