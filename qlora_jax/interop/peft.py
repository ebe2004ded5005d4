"""LoRA adapters out to PEFT's format and back in.

A PEFT LoRA adapter is a folder with `adapter_config.json` (see
`peft_config`) and `adapter_model.safetensors`, whose keys are

  base_model.model.<HF module>.lora_A.weight     [r, in]   (lora_a.T)
  base_model.model.<HF module>.lora_B.weight     [out, r]  (lora_b.T)
  base_model.model.<HF module>.lora_magnitude_vector  [out]  (DoRA)
  base_model.model.<HF module>.<weight|bias|...>  modules_to_save, in the
      HF layout (a flax kernel [in, out] is written as weight [out, in])

for every adapted module, one per layer (scanned blocks are written per
layer and stacked again on import). GPT-2's Conv1D layers hold the same
[r, in] / [out, r] adapters as a Linear (PEFT sets `fan_in_fan_out`, which
only changes how it merges).
"""

import json
import pathlib
from collections.abc import Mapping
from typing import Any

import numpy as np
import safetensors.numpy
from absl import logging

from qlora_jax import models
from qlora_jax import nn as qnn
from qlora_jax.interop import peft_config
from qlora_jax.interop.naming import Names, Path

PREFIX = "base_model.model."
WEIGHTS_FILE = "adapter_model.safetensors"
LORA_KEYS = {
  "lora_a": ".lora_A.weight",
  "lora_b": ".lora_B.weight",
  "lora_magnitude": ".lora_magnitude_vector",
}


def _pop(flat, path: Path, what: str):
  if path not in flat:
    raise KeyError(f"trainable tree has no {'/'.join(path)} ({what})")
  return np.asarray(flat.pop(path), np.float32)


def adapter_tensors(
  trainable: Mapping[str, Any], plan: qnn.Plan, names: Names
) -> tuple[dict[str, np.ndarray], dict[str, qnn.LoraSpec], list[str]]:
  """(PEFT tensors by key, LoraSpec per adapted HF module, modules_to_save).

  Raises:
    KeyError / ValueError: the tree does not fit the plan, or holds a
      variable that has no place in a PEFT adapter (part of a module).
  """
  flat = qnn.flatten(trainable)
  tensors: dict[str, np.ndarray] = {}
  specs: dict[str, qnn.LoraSpec] = {}
  for path in plan.lora_paths():
    spec = plan.lookup(path).lora
    keys = (qnn.PARAMS, *path.split("/"))
    leaves = {
      k: _pop(flat, (*keys, k), f"adapter of {path}")
      for k in ("lora_a", "lora_b")
    }
    if spec.dora:
      leaves["lora_magnitude"] = _pop(flat, (*keys, "lora_magnitude"), "DoRA")
    for layer in names.layers((qnn.BASE, *path.split("/"), "weight")):
      module = names.module_of(path, layer)
      specs[module] = spec
      for leaf, value in leaves.items():
        one = value if layer is None else value[layer]
        if leaf == "lora_a" and spec.qa:  # a LoRA A of block-repeated rows
          base = names.tensor((qnn.BASE, *path.split("/"), "weight"), layer)
          one = np.asarray(qnn.full_a(one, base.shape[-1]))
        one = one.T if one.ndim == 2 else one
        tensors[PREFIX + module + LORA_KEYS[leaf]] = np.ascontiguousarray(one)
  saved = _modules_to_save(flat, names, set(specs))
  tensors.update({PREFIX + k: v for k, v in saved[0].items()})
  return tensors, specs, saved[1]


def _modules_to_save(flat, names: Names, adapted: set[str]):
  """({HF tensor name: array}, module names) of heads and trained base
  variables; each module must be trained whole."""
  out: dict[str, np.ndarray] = {}
  by_module: dict[str, set[str]] = {}
  for path, value in flat.items():
    value = np.asarray(value)
    layers = names.layers(path) if path[0] == qnn.BASE else [None]
    for layer in layers:
      t = names.tensor(path, layer)
      one = value if layer is None else value[layer]
      out[t.name] = np.ascontiguousarray(one.T if t.transposed else one)
      by_module.setdefault(t.module, set()).add(t.name)
  for module, got in by_module.items():
    if module in adapted:
      raise ValueError(
        f"module {module} has an adapter and trained variables {sorted(got)}"
        ": PEFT cannot save both"
      )
    whole = {n for n, t in names.tensors.items() if t.module == module}
    if whole - got:
      raise ValueError(
        f"module {module} is trained only in part ({sorted(got)}; not "
        f"{sorted(whole - got)}): PEFT's modules_to_save saves whole modules"
      )
  return out, sorted(by_module)


def write_adapter(
  out: str | pathlib.Path,
  trainable: Mapping[str, Any],
  plan: qnn.Plan,
  spec: models.ModelSpec,
  scan_layers: bool,
  base: str,
) -> dict[str, Any]:
  """Writes adapter_config.json and adapter_model.safetensors; returns the
  config.

  Args:
    out: the folder to write (created).
    trainable: the trainable tree ({"params": ..., maybe "base": ...}).
    plan: the plan the model was built with.
    spec: the model's config and task.
    scan_layers: whether the model stacks its blocks.
    base: base_model_name_or_path (the base checkpoint folder).
  """
  names = Names(spec, scan_layers)
  tensors, specs, saved = adapter_tensors(trainable, plan, names)
  if not specs:
    raise ValueError("the run has no LoRA adapters to export")
  config = peft_config.write_config(
    specs,
    list(names.linear_modules()) + names.unused_linears(),
    task=spec.task,
    base=base,
    modules_to_save=saved,
    fan_in_fan_out=spec.layout.transposed is not None,
  )
  out = pathlib.Path(out)
  out.mkdir(parents=True, exist_ok=True)
  safetensors.numpy.save_file(
    tensors, str(out / WEIGHTS_FILE), metadata={"format": "pt"}
  )
  (out / peft_config.CONFIG_FILE).write_text(json.dumps(config, indent=2))
  logging.debug("wrote %d adapter tensors to %s", len(tensors), out)
  return config
