"""PEFT's `adapter_config.json` for LoRA: written from a plan, read back.

Facts from PEFT 0.21 (`peft/tuners/lora/config.py`, `tuners_utils.py`,
`utils/other.py`), which decide how a config selects modules:

* `target_modules` as a list selects a module whose name is in the list or
  ends with "." + an entry; as a string, a regex that must match the whole
  module name (`re.fullmatch`).
* `exclude_modules` the same way; modules in `modules_to_save` never get
  adapters.
* `rank_pattern` / `alpha_pattern`: the first key `k` (in file order) with
  `re.match(rf"(.*\\.)?({k})$", module)` gives the module's rank / alpha.
* Scaling: alpha / r, or alpha / sqrt(r) with `use_rslora`.
"""

import json
import pathlib
import re
from collections import Counter
from collections.abc import Iterable, Mapping
from typing import Any

from qlora_jax import nn as qnn

CONFIG_FILE = "adapter_config.json"
TASK_TYPES = {
  "causal_lm": "CAUSAL_LM",
  "classification": "SEQ_CLS",
  "embedding": "FEATURE_EXTRACTION",
}
# init_lora_weights values whose saved weights are a plain LoRA over the
# unmodified base (PiSSA, OLoRA, LoftQ, CorDA, LoRA-GA change the base).
PLAIN_INITS = (True, False, "gaussian", "eva", "orthogonal")
_INITS_OUT = {"kaiming": True, "gaussian": "gaussian"}
# Keys read here, and keys that are metadata or only matter with another
# option; any other key must be unset (null, false, empty).
_USED = {
  "peft_type",
  "task_type",
  "r",
  "lora_alpha",
  "lora_dropout",
  "target_modules",
  "exclude_modules",
  "use_rslora",
  "use_dora",
  "rank_pattern",
  "alpha_pattern",
  "modules_to_save",
  "bias",
  "init_lora_weights",
  "fan_in_fan_out",
}
_METADATA = {
  "base_model_name_or_path",
  "revision",
  "inference_mode",
  "peft_version",
  "auto_mapping",
  "megatron_core",
  "qalora_group_size",
  "eva_config",
}


class AdapterError(ValueError):
  """A PEFT adapter that this codebase cannot load; names key and file."""


def read_adapter_config(folder: str | pathlib.Path) -> tuple[dict, str]:
  """(adapter_config.json as a dict, its path)."""
  path = pathlib.Path(folder) / CONFIG_FILE
  if not path.is_file():
    raise AdapterError(f"no {CONFIG_FILE} in {folder}")
  try:
    raw = json.loads(path.read_text())
  except json.JSONDecodeError as e:
    raise AdapterError(f"{path}: invalid JSON: {e}") from e
  if not isinstance(raw, dict):
    raise AdapterError(f"{path}: expected a JSON object")
  return raw, str(path)


def _err(source: str, key: str, what: str) -> AdapterError:
  return AdapterError(f"{source}: {key!r} {what}")


def check_config(raw: Mapping[str, Any], source: str, task: str) -> None:
  """Raises on anything this codebase would load differently from PEFT."""
  if raw.get("peft_type") != "LORA":
    raise _err(
      source, "peft_type", f"is {raw.get('peft_type')!r}: only 'LORA' loads"
    )
  task_type = raw.get("task_type")
  if task_type not in (None, TASK_TYPES[task]):
    raise _err(
      source,
      "task_type",
      f"is {task_type!r}, but the model is loaded for task {task!r} "
      f"({TASK_TYPES[task]})",
    )
  if raw.get("bias", "none") != "none":
    raise _err(source, "bias", f"is {raw['bias']!r}: only 'none' is supported")
  init = raw.get("init_lora_weights", True)
  if init not in PLAIN_INITS:
    raise _err(
      source,
      "init_lora_weights",
      f"is {init!r}: that initialisation changes the base weights, so the "
      "adapter does not apply to the base checkpoint (convert it to a plain "
      "LoRA with PEFT first)",
    )
  for key in ("r", "lora_alpha"):
    value = raw.get(key)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
      raise _err(source, key, f"must be a number, got {value!r}")
  if not raw.get("target_modules"):
    raise _err(source, "target_modules", "is empty: nothing to load")
  for key, value in raw.items():
    if key in _USED or key in _METADATA:
      continue
    if value not in (None, False, {}, [], ""):
      raise _err(source, key, f"is {value!r}: the option is not supported")


def _listed(key: str, names: Iterable[str]) -> bool:
  return any(key == n or key.endswith("." + n) for n in names)


def _selects(rule, key: str) -> bool:
  if isinstance(rule, str):
    return re.fullmatch(rule, key) is not None
  return _listed(key, rule)


def targeted(raw: Mapping[str, Any], source: str, modules: list[str]):
  """The modules (HF names) PEFT would adapt among `modules`."""
  targets = raw["target_modules"]
  exclude = raw.get("exclude_modules")
  saved = raw.get("modules_to_save") or []
  if targets == "all-linear":
    raise _err(
      source,
      "target_modules",
      "is 'all-linear': PEFT resolves it against the model when the adapter "
      "is made, and saves the resolved list; save the adapter with PEFT",
    )
  chosen = []
  for key in modules:
    if exclude and _selects(exclude, key):
      continue
    if any(re.match(rf"(^|.*\.){m}($|\..*)", key) for m in saved):
      continue
    if _selects(targets, key):
      chosen.append(key)
  if not isinstance(targets, str):
    leaves = {m.rsplit(".", 1)[-1] for m in modules}
    missing = [t for t in targets if not any(_listed(m, [t]) for m in modules)]
    if missing:
      raise _err(
        source,
        "target_modules",
        f"names {missing}, which match no linear layer of the model; its "
        f"layers are named {sorted(leaves)}",
      )
  if not chosen:
    raise _err(source, "target_modules", f"{targets!r} matches no linear layer")
  return chosen


def pattern_value(patterns: Mapping[str, Any], module: str, default: Any):
  """PEFT's rank_pattern / alpha_pattern lookup for one module."""
  for key, value in patterns.items():
    if re.match(rf"(.*\.)?({key})$", module):
      return value
  return default


def _number(x: float) -> int | float:
  return int(x) if float(x).is_integer() else float(x)


def _most_common(values: Iterable) -> Any:
  return Counter(values).most_common(1)[0][0]


def _patterns(values: Mapping[str, Any], default) -> dict[str, Any]:
  """Per-module values that differ from `default`, by leaf name when every
  module with that leaf name agrees, else by escaped full name."""
  by_leaf: dict[str, dict[str, Any]] = {}
  for module, v in values.items():
    by_leaf.setdefault(module.rsplit(".", 1)[-1], {})[module] = v
  out: dict[str, Any] = {}
  for leaf, group in sorted(by_leaf.items()):
    distinct = set(group.values())
    if distinct == {default}:
      continue
    if len(distinct) == 1:
      out[re.escape(leaf)] = _number(distinct.pop())
      continue
    for module, v in sorted(group.items()):
      if v != default:
        out[re.escape(module)] = _number(v)
  return out


def _target_modules(adapted: set[str], linears: set[str]) -> list[str] | str:
  """Leaf names when they select exactly `adapted`, else an exact regex."""
  leaves = {m.rsplit(".", 1)[-1] for m in adapted}
  if {m for m in linears if _listed(m, leaves)} == adapted:
    return sorted(leaves)
  return "(" + "|".join(re.escape(m) for m in sorted(adapted)) + ")"


def write_config(
  specs: Mapping[str, qnn.LoraSpec],
  linears: Iterable[str],
  *,
  task: str,
  base: str,
  modules_to_save: list[str],
  fan_in_fan_out: bool,
) -> dict[str, Any]:
  """adapter_config.json of adapters `specs` ({HF module: spec}).

  Args:
    specs: every adapted module, per layer.
    linears: every linear module of the HF model (to decide whether leaf
      names in `target_modules` select exactly the adapted ones).
    task: the model's task.
    base: base_model_name_or_path.
    modules_to_save: HF names of fully trained modules.
    fan_in_fan_out: the base stores weights [in, out] (GPT-2's Conv1D).
  """
  common = {(s.rslora, s.dora, s.dropout, s.init) for s in specs.values()}
  if len(common) != 1:
    raise ValueError(f"adapters differ in rslora/dora/dropout/init: {common}")
  rslora, dora, dropout, init = common.pop()
  if init not in _INITS_OUT:
    raise ValueError(
      f"lora init {init!r} trains against a changed base (the base holds a "
      "residual), so the adapter does not apply to the base checkpoint: "
      "export the merged model instead"
    )
  ranks = {m: s.rank for m, s in specs.items()}
  alphas = {m: s.alpha for m, s in specs.items()}
  r, alpha = _most_common(ranks.values()), _most_common(alphas.values())
  return {
    "peft_type": "LORA",
    "task_type": TASK_TYPES[task],
    "base_model_name_or_path": base,
    "r": r,
    "lora_alpha": _number(alpha),
    "lora_dropout": dropout,
    "target_modules": _target_modules(set(specs), set(linears)),
    "exclude_modules": None,
    "rank_pattern": _patterns(ranks, r),
    "alpha_pattern": _patterns(alphas, alpha),
    "use_rslora": rslora,
    "use_dora": dora,
    "modules_to_save": modules_to_save or None,
    "bias": "none",
    "lora_bias": False,
    "fan_in_fan_out": fan_in_fan_out,
    "init_lora_weights": _INITS_OUT[init],
    "layers_to_transform": None,
    "layers_pattern": None,
    "inference_mode": True,
    "revision": None,
  }
