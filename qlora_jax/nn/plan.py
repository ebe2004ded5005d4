"""Which linear layers get adapters and which are quantized.

A model's linear layers are named by their module path joined with "/"
("layers_0/self_attn/q_proj"). Targets are chosen by:

* "all-linear": every linear layer except the model's output heads;
* a list of names: layers whose last path component is one of them (PEFT's
  `target_modules` list);
* any other string: a regular expression searched in the path.

Exclusions use the same forms. `rank_pattern` / `alpha_pattern` map a regex
to a per-layer rank / alpha (the first matching pattern wins).
"""

import dataclasses
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from qlora_jax.nn.lora import LoraSpec
from qlora_jax.quant import QuantSpec

ALL_LINEAR = "all-linear"


@dataclasses.dataclass(frozen=True)
class LayerSpec:
  """What one linear layer holds: an adapter and/or a quantized base."""

  lora: LoraSpec | None = None
  quant: QuantSpec | None = None


@dataclasses.dataclass(frozen=True)
class Plan:
  """Per-layer specs, keyed by module path. Hashable: a module attribute."""

  layers: tuple[tuple[str, LayerSpec], ...] = ()

  def lookup(self, path: str) -> LayerSpec:
    for p, spec in self.layers:
      if p == path:
        return spec
    return LayerSpec()

  def as_dict(self) -> dict[str, LayerSpec]:
    return dict(self.layers)

  def lora_paths(self) -> list[str]:
    return [p for p, s in self.layers if s.lora is not None]

  def quant_paths(self) -> list[str]:
    return [p for p, s in self.layers if s.quant is not None]


Targets = str | Sequence[str] | None


def select(
  paths: Iterable[str], targets: Targets, heads: Iterable[str] = (), what=""
) -> list[str]:
  """Paths chosen by `targets` (see the module docstring).

  Raises:
    ValueError: a regex or name that matches no path.
  """
  paths = list(paths)
  if not targets:  # None, "", []: nothing
    return []
  if isinstance(targets, str):
    if targets == ALL_LINEAR:
      head_set = set(heads)
      return [p for p in paths if p not in head_set]
    try:
      pattern = re.compile(targets)
    except re.error as e:
      raise ValueError(f"{what}: invalid regex {targets!r}: {e}") from e
    chosen = [p for p in paths if pattern.search(p)]
    if not chosen:
      raise ValueError(
        f"{what}: regex {targets!r} matches no linear layer; layers are "
        f"{_preview(paths)}"
      )
    return chosen
  names = list(targets)
  leaf = {p: p.split("/")[-1] for p in paths}
  missing = [n for n in names if n not in leaf.values()]
  if missing:
    raise ValueError(
      f"{what}: no linear layer named {missing}; layer names are "
      f"{sorted(set(leaf.values()))}"
    )
  return [p for p in paths if leaf[p] in names]


def _preview(paths: list[str], n: int = 8) -> str:
  shown = ", ".join(paths[:n])
  return f"[{shown}{', ...' if len(paths) > n else ''}] ({len(paths)} in all)"


def _pattern_value(
  path: str, patterns: Mapping[str, Any], default: Any, used: set
) -> Any:
  for regex, value in patterns.items():
    if re.search(regex, path):
      used.add(regex)
      return value
  return default


def make_plan(
  linear_paths: Sequence[str],
  lora: Mapping[str, Any] | None,
  quant_cfg: Mapping[str, Any] | None,
  heads: Sequence[str] = (),
) -> Plan:
  """Resolves adapter and quantization targets over a model's linear layers.

  Args:
    linear_paths: every linear layer's path.
    lora: None for no adapters, or a mapping with keys `targets`, `exclude`,
      `rank`, `alpha`, `rank_pattern`, `alpha_pattern` and the LoraSpec
      fields (`rslora`, `dropout`, `init`, `loftq_iters`, `dora`, `qa`).
    quant_cfg: None (or data_type "none") for a float base, or a mapping with
      `data_type`, `block_size`, `double_quant`, `targets`, `exclude`.
    heads: output heads, left out of "all-linear".

  Raises:
    ValueError: unknown keys or values, a target matching nothing, a rank
      larger than a layer allows (checked when the layer is built).
  """
  linear_paths = list(linear_paths)
  lora_specs: dict[str, LoraSpec] = {}
  if lora:
    lora = dict(lora)
    _check_keys("lora", lora, _LORA_KEYS)
    chosen = select(
      linear_paths, lora.get("targets", ALL_LINEAR), heads, "lora.targets"
    )
    excluded = set(
      select(linear_paths, lora.get("exclude"), heads, "lora.exclude")
    )
    rank_pattern = dict(lora.get("rank_pattern") or {})
    alpha_pattern = dict(lora.get("alpha_pattern") or {})
    used: set = set()
    common = {k: lora[k] for k in _SPEC_KEYS if k in lora}
    for p in chosen:
      if p in excluded:
        continue
      rank = _pattern_value(p, rank_pattern, lora.get("rank", 8), used)
      alpha = _pattern_value(p, alpha_pattern, lora.get("alpha", 16.0), used)
      lora_specs[p] = LoraSpec(
        rank=_whole(rank, f"lora rank of {p}"), alpha=float(alpha), **common
      )
    unused = (set(rank_pattern) | set(alpha_pattern)) - used
    if unused:
      raise ValueError(
        f"lora rank_pattern/alpha_pattern {sorted(unused)} match no adapted "
        "layer"
      )
  quant_specs: dict[str, QuantSpec] = {}
  if quant_cfg:
    _check_keys("quant", quant_cfg, _QUANT_KEYS)
  if quant_cfg and str(quant_cfg.get("data_type", "none")) != "none":
    quant_cfg = dict(quant_cfg)
    spec = QuantSpec(
      str(quant_cfg["data_type"]),
      _whole(quant_cfg.get("block_size", 64), "quant block_size"),
      bool(quant_cfg.get("double_quant", True)),
    )
    chosen = select(
      linear_paths, quant_cfg.get("targets", ALL_LINEAR), heads, "quant.targets"
    )
    excluded = set(
      select(linear_paths, quant_cfg.get("exclude"), heads, "quant.exclude")
    )
    quant_specs = {p: spec for p in chosen if p not in excluded}
  layers = []
  for p in linear_paths:
    spec = LayerSpec(lora_specs.get(p), quant_specs.get(p))
    if spec != LayerSpec():
      layers.append((p, spec))
  return Plan(tuple(layers))


_SPEC_KEYS = ("rslora", "dropout", "init", "loftq_iters", "dora", "qa")
_LORA_KEYS = _SPEC_KEYS + (
  "targets",
  "exclude",
  "rank",
  "alpha",
  "rank_pattern",
  "alpha_pattern",
)
_QUANT_KEYS = ("data_type", "block_size", "double_quant", "targets", "exclude")


def _whole(value: Any, what: str) -> int:
  """`value` as an int; a fraction or a non-number is an error."""
  if isinstance(value, bool) or not isinstance(value, (int, float)):
    raise ValueError(f"{what}: expected a whole number, got {value!r}")
  if int(value) != value:
    raise ValueError(f"{what}: expected a whole number, got {value!r}")
  return int(value)


def _check_keys(section: str, cfg: Mapping[str, Any], known) -> None:
  unknown = sorted(set(cfg) - set(known))
  if unknown:
    raise ValueError(
      f"unknown {section} option(s) {unknown}: expected {sorted(known)}"
    )


def plan_lines(plan: Plan, n_linear: int) -> list[str]:
  """The plan as text: one line per planned layer, then a count."""
  lines = []
  for path, spec in plan.layers:
    parts = []
    if spec.lora is not None:
      lo = spec.lora
      parts.append(f"lora r={lo.rank} alpha={lo.alpha:g} init={lo.init}")
      if lo.dora:
        parts.append("dora")
      if lo.qa:
        parts.append("qa")
    if spec.quant is not None:
      q = spec.quant
      parts.append(
        f"{q.data_type} block={q.block_size}{' +dq' if q.double_quant else ''}"
      )
    lines.append(f"layer {path}: {', '.join(parts)}")
  lines.append(
    f"{len(plan.lora_paths())} of {n_linear} linear layers have adapters, "
    f"{len(plan.quant_paths())} are quantized"
  )
  return lines
