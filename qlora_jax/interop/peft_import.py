"""PEFT LoRA adapters into this codebase: a plan and a trainable tree.

  lm, adapter = from_peft("base_folder", "adapter_folder")

builds the plan from adapter_config.json (targets, per-module ranks and
alphas, rslora, DoRA), loads the base as `models.from_pretrained` does
(quantized if asked) and puts the adapter's tensors into "params"
(transposed; stacked for scanned blocks). Everything is checked before a
tensor is used; a mismatch raises `AdapterError` naming the key and file.
"""

import dataclasses
import pathlib
import re
from collections.abc import Callable, Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np
from absl import logging
from safetensors import safe_open

from qlora_jax import models
from qlora_jax import nn as qnn
from qlora_jax.interop import peft_config
from qlora_jax.interop.naming import Names, Path, Tensor, head_tensor
from qlora_jax.interop.peft import LORA_KEYS, PREFIX, WEIGHTS_FILE
from qlora_jax.interop.peft_config import AdapterError


@dataclasses.dataclass
class Adapter:
  """A PEFT adapter resolved against one model.

  Attributes:
    config: adapter_config.json.
    lora: the `lora` mapping for `models.from_pretrained` / `make_plan`.
    variables: {(collection, *path): float32 array} to put into the
      model's variables (stacked for scanned blocks).
    train_paths: the "base" variables the adapter trains (its
      modules_to_save), as "model/norm/scale".
  """

  config: dict
  lora: dict
  variables: dict[Path, np.ndarray]
  train_paths: list[str]

  @property
  def train_patterns(self) -> list[str]:
    """Regexes of `train_paths` for `qlora_jax.nn.split_trainable`."""
    return [_anchored([p]) for p in self.train_paths]


def _anchored(paths) -> str:
  return "^(" + "|".join(re.escape(p) for p in sorted(paths)) + ")$"


def _lora_mapping(raw, source, names: Names) -> tuple[dict, dict, set]:
  """(make_plan's lora mapping, {HF module: (rank, weight)}, modules our
  model does not compute)."""
  linears = names.linear_modules()
  unused = set(names.unused_linears())
  chosen = peft_config.targeted(raw, source, list(linears) + sorted(unused))
  r, alpha = int(raw["r"]), float(raw["lora_alpha"])
  ranks = raw.get("rank_pattern") or {}
  alphas = raw.get("alpha_pattern") or {}
  by_path: dict[str, dict[str, tuple[int, float]]] = {}
  modules: dict[str, tuple[int, Tensor]] = {}
  for m in chosen:
    rank = int(peft_config.pattern_value(ranks, m, r))
    a = float(peft_config.pattern_value(alphas, m, alpha))
    if m in unused:
      continue
    weight = linears[m]
    modules[m] = (rank, weight)
    by_path.setdefault("/".join(weight.path[1:-1]), {})[m] = (rank, a)
  rank_pattern, alpha_pattern = {}, {}
  for path, group in by_path.items():
    expected = names.layers((qnn.BASE, *path.split("/"), "weight"))
    if len(group) != len(expected) or len(set(group.values())) != 1:
      raise AdapterError(
        f"{source}: 'target_modules' / 'rank_pattern' / 'alpha_pattern' "
        f"give the stacked layers of {path} different adapters "
        f"({_preview(group)}): load with scan_layers=False"
      )
    rank, a = next(iter(group.values()))
    if rank != r:
      rank_pattern[_anchored([path])] = rank
    if a != alpha:
      alpha_pattern[_anchored([path])] = a
  lora = {
    "targets": _anchored(by_path),
    "rank": r,
    "alpha": alpha,
    "rank_pattern": rank_pattern,
    "alpha_pattern": alpha_pattern,
    "rslora": bool(raw.get("use_rslora", False)),
    "dora": bool(raw.get("use_dora", False)),
    "dropout": float(raw.get("lora_dropout", 0.0)),
    "init": "gaussian"
    if raw.get("init_lora_weights") == "gaussian"
    else "kaiming",
  }
  return lora, modules, unused


def _preview(group: Mapping[str, Any], n: int = 4) -> str:
  items = [f"{k}: {v}" for k, v in list(group.items())[:n]]
  return ", ".join(items) + (", ..." if len(group) > n else "")


def _heads(spec: models.ModelSpec, scan_layers: bool) -> dict[str, Tensor]:
  shapes = spec.abstract_variables(models.Options(scan_layers=scan_layers))
  heads = {}
  params = {qnn.PARAMS: shapes.get(qnn.PARAMS, {})}
  for path, leaf in qnn.flatten(params).items():
    t = head_tensor(path, tuple(leaf.shape))
    heads[t.name] = t
  return heads


def _split_key(key: str) -> tuple[str, str | None]:
  """(HF module or tensor name, our LoRA leaf or None)."""
  for leaf, suffix in LORA_KEYS.items():
    if key.endswith(suffix):
      return key[: -len(suffix)], leaf
  return key, None


def _read(f, key: str, source: str) -> np.ndarray:
  array = f.get_tensor(key)
  if not np.issubdtype(array.dtype, np.floating) and array.dtype.name != (
    "bfloat16"
  ):
    raise AdapterError(f"{source}: tensor {key!r} has dtype {array.dtype}")
  array = np.asarray(array, np.float32)
  if not np.isfinite(array).all():
    raise AdapterError(f"{source}: tensor {key!r} has non-finite values")
  return array


def read_adapter(
  folder: str | pathlib.Path, spec: models.ModelSpec, scan_layers: bool
) -> Adapter:
  """Resolves a PEFT adapter folder against the model `spec`.

  Raises:
    AdapterError: an unknown peft_type, an unsupported option, targets that
      match nothing, a missing, unexpected or misshapen tensor.
  """
  raw, config_source = peft_config.read_adapter_config(folder)
  peft_config.check_config(raw, config_source, spec.task)
  names = Names(spec, scan_layers)
  lora, modules, unused = _lora_mapping(raw, config_source, names)
  source = str(pathlib.Path(folder) / WEIGHTS_FILE)
  if not pathlib.Path(source).is_file():
    raise AdapterError(f"no {WEIGHTS_FILE} in {folder}")
  dora = lora["dora"]
  saved = raw.get("modules_to_save") or []
  heads = _heads(spec, scan_layers)
  per_layer: dict[Path, dict[int | None, np.ndarray]] = {}
  seen: set[tuple[str, str]] = set()
  with safe_open(source, framework="numpy") as f:
    for key in f.keys():
      if not key.startswith(PREFIX):
        raise AdapterError(f"{source}: key {key!r} does not start {PREFIX!r}")
      name, leaf = _split_key(key[len(PREFIX) :])
      if leaf is None:
        t = _saved_tensor(name, key, source, saved, names, heads)
        expected = t.hf_shape
      elif name in unused:
        logging.warning(
          "%s: skipping %s (not computed by the model)", source, key
        )
        continue
      elif name not in modules:
        raise AdapterError(
          f"{source}: key {key!r}: {name} is not an adapted linear layer of "
          f"the model (adapted per {config_source}: {_preview(modules)})"
        )
      elif leaf == "lora_magnitude" and not dora:
        raise AdapterError(
          f"{source}: key {key!r} is a DoRA magnitude, but 'use_dora' is "
          f"false in {config_source}"
        )
      else:
        rank, t = modules[name]
        out_f, in_f = t.shape
        expected = {
          "lora_a": (rank, in_f),
          "lora_b": (out_f, rank),
          "lora_magnitude": (out_f,),
        }[leaf]
        seen.add((name, leaf))
      shape = tuple(f.get_slice(key).get_shape())
      if shape != expected:
        raise AdapterError(
          f"{source}: tensor {key!r} has shape {shape}, but the model and "
          f"{config_source} give {expected}"
        )
      array = _read(f, key, source)
      if leaf is None:
        path, layer = t.path, t.layer
        array = array.T if t.transposed else array
      else:
        path = (qnn.PARAMS, *t.path[1:-1], leaf)
        layer, array = t.layer, array if array.ndim == 1 else array.T
      per_layer.setdefault(path, {})[layer] = array
  leaves = ("lora_a", "lora_b") + (("lora_magnitude",) if dora else ())
  missing = [
    PREFIX + m + LORA_KEYS[leaf]
    for m in modules
    for leaf in leaves
    if (m, leaf) not in seen
  ]
  if missing:
    raise AdapterError(
      f"{source}: missing tensor(s) {missing[:4]}"
      f"{' ...' if len(missing) > 4 else ''} ({len(missing)} in all) that "
      f"{config_source} implies"
    )
  variables = {p: _stack(p, v, names, source) for p, v in per_layer.items()}
  trained = sorted("/".join(p[1:]) for p in variables if p[0] == qnn.BASE)
  return Adapter(raw, lora, variables, trained)


def _saved_tensor(name, key, source, saved, names: Names, heads) -> Tensor:
  """The variable of a modules_to_save tensor."""
  module = name.rsplit(".", 1)[0]
  if not any(module.endswith(m) for m in saved):
    raise AdapterError(
      f"{source}: key {key!r} is neither a LoRA tensor nor part of a module "
      f"in 'modules_to_save' ({saved})"
    )
  if name in heads:
    return heads[name]
  if name in names.tensors:
    return names.tensors[name]
  raise AdapterError(
    f"{source}: key {key!r}: the model has no variable {name!r} "
    f"(module {module} in 'modules_to_save')"
  )


def _stack(path: Path, layers: dict, names: Names, source: str) -> np.ndarray:
  if None in layers:
    return layers[None]
  count = names.num_layers
  missing = sorted(set(range(count)) - set(layers))
  if missing:
    raise AdapterError(
      f"{source}: {'/'.join(path)} of layer(s) {missing} is missing: a "
      "model with scan_layers needs every layer; load with scan_layers=False"
    )
  return np.stack([layers[i] for i in range(count)])


Place = Callable[[str, Any], Any]


def apply_adapter(
  variables: Mapping[str, Any], adapter: Adapter, place: Place | None = None
) -> dict:
  """`variables` with the adapter's tensors in place (same dtypes)."""
  place = place or models.loading.default_place
  flat = qnn.flatten(variables)
  for path, value in adapter.variables.items():
    if path not in flat:
      raise AdapterError(
        f"the model has no variable {'/'.join(path)}: build it with the "
        "adapter's `lora` mapping"
      )
    old = flat[path]
    if tuple(old.shape) != value.shape:
      raise AdapterError(
        f"variable {'/'.join(path)} is {tuple(old.shape)} in the model, "
        f"{value.shape} in the adapter"
      )
    flat[path] = place("/".join(path), jnp.asarray(value, old.dtype))
  return qnn.unflatten(flat)


def _num_labels(folder: pathlib.Path) -> int | None:
  path = folder / WEIGHTS_FILE
  if not path.is_file():
    return None
  with safe_open(str(path), framework="numpy") as f:
    key = PREFIX + "classifier.weight"
    if key in f.keys():
      return int(f.get_slice(key).get_shape()[0])
  return None


def from_peft(
  base: str | pathlib.Path,
  adapter: str | pathlib.Path,
  *,
  task: str = "causal_lm",
  num_labels: int | None = None,
  scan_layers: bool = False,
  **kwargs,
) -> tuple[models.Pretrained, Adapter]:
  """The base checkpoint with a PEFT adapter loaded into its "params".

  Args:
    base: the Hugging Face folder the adapter was trained on.
    adapter: the PEFT adapter folder.
    task, scan_layers: as `models.from_pretrained`.
    num_labels: classification labels; default: from the adapter's
      classifier.
    **kwargs: other arguments of `models.from_pretrained` (quant, dtype,
      base_dtype, remat, seed, place), not `lora`.
  """
  if "lora" in kwargs:
    raise ValueError("from_peft takes the adapters from the PEFT config")
  base, folder = pathlib.Path(base), pathlib.Path(adapter)
  if task == "classification" and num_labels is None:
    num_labels = _num_labels(folder)
  config = models.read_config(base / "config.json")
  spec = models.ModelSpec(config, task, num_labels)
  resolved = read_adapter(folder, spec, scan_layers)
  lm = models.from_pretrained(
    base,
    task=task,
    num_labels=num_labels,
    lora=resolved.lora,
    scan_layers=scan_layers,
    **kwargs,
  )
  lm.variables = apply_adapter(lm.variables, resolved, kwargs.get("place"))
  return lm, resolved
