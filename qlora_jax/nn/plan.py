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
from qlora_jax.quant import QuantSpec, SpecError

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


@dataclasses.dataclass(frozen=True)
class LoraTargets:
  """Which layers get adapters, and the adapter each gets.

  Attributes:
    spec: the adapter of every chosen layer (its rank and alpha unless a
      pattern gives the layer its own).
    targets: the layers chosen (see the module docstring).
    exclude: layers left out of `targets`.
    rank_pattern: regex -> rank (the first matching pattern wins).
    alpha_pattern: regex -> alpha.
  """

  spec: LoraSpec = LoraSpec()
  targets: Targets = ALL_LINEAR
  exclude: Targets = None
  rank_pattern: tuple[tuple[str, int], ...] = ()
  alpha_pattern: tuple[tuple[str, float], ...] = ()

  def __post_init__(self):
    for name in ("targets", "exclude"):
      value = getattr(self, name)
      if isinstance(value, list):
        object.__setattr__(self, name, tuple(value))
    for name in ("rank_pattern", "alpha_pattern"):
      value = getattr(self, name)
      if isinstance(value, Mapping):
        object.__setattr__(self, name, tuple(value.items()))
    for regex, rank in self.rank_pattern:
      if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise SpecError(
          "rank_pattern",
          f"{regex!r}: rank must be a whole number >= 1, got {rank!r}",
        )
    for regex, alpha in self.alpha_pattern:
      try:  # LoraSpec owns the rule for alpha
        dataclasses.replace(self.spec, alpha=alpha)
      except SpecError as e:
        raise SpecError("alpha_pattern", f"{regex!r}: {e.reason}") from None

  @classmethod
  def parse(cls, value: "LoraTargets | Mapping | None") -> "LoraTargets | None":
    """None, a LoraTargets, or a flat mapping of its fields and LoraSpec's
    (`{"rank": 16, "targets": "all-linear"}`; a missing key keeps its
    default)."""
    if value is None or isinstance(value, cls):
      return value
    flat = dict(value)
    _check_keys("lora", flat, _LORA_KEYS)
    spec = LoraSpec(**{k: flat.pop(k) for k in _SPEC_KEYS if k in flat})
    return cls(spec=spec, **flat)


@dataclasses.dataclass(frozen=True)
class QuantTargets:
  """Which frozen linear weights are quantized, and how."""

  spec: QuantSpec = QuantSpec()
  targets: Targets = ALL_LINEAR
  exclude: Targets = None

  def __post_init__(self):
    for name in ("targets", "exclude"):
      value = getattr(self, name)
      if isinstance(value, list):
        object.__setattr__(self, name, tuple(value))

  @classmethod
  def parse(
    cls, value: "QuantTargets | Mapping | None"
  ) -> "QuantTargets | None":
    """None, a QuantTargets, or a flat mapping of its fields and
    QuantSpec's. Data type "none" (`FLOAT`) means a float base: None.
    This is the one reader of that name."""
    if value is None or isinstance(value, cls):
      return value
    flat = dict(value)
    _check_keys("quant", flat, _QUANT_KEYS)
    if flat.get("data_type") == FLOAT:
      return None
    spec = QuantSpec(**{k: flat.pop(k) for k in _QSPEC_KEYS if k in flat})
    return cls(spec=spec, **flat)


# quant.data_type of a float (unquantized) base.
FLOAT = "none"


def check_pair(lora: LoraTargets | None, quant: QuantTargets | None) -> None:
  """Rules between the adapters and the quantization.

  Raises:
    SpecError: QA-LoRA (field "qa") over a base that is not asymmetric.
  """
  if lora is None or not lora.spec.qa:
    return
  if quant is None or not quant.spec.asymmetric:
    dtype = quant.spec.data_type if quant is not None else FLOAT
    raise SpecError(
      "qa",
      "QA-LoRA folds its update into block minimums: it needs quant."
      f"data_type 'int4_asym' (or another 'int<k>_asym'), got {dtype!r}",
    )


def make_plan(
  linear_paths: Sequence[str],
  lora: LoraTargets | Mapping[str, Any] | None,
  quant: QuantTargets | Mapping[str, Any] | None,
  heads: Sequence[str] = (),
) -> Plan:
  """Resolves adapter and quantization targets over a model's linear layers.

  Args:
    linear_paths: every linear layer's path.
    lora: None for no adapters, or a `LoraTargets` (or a mapping that
      `LoraTargets.parse` takes).
    quant: None for a float base, or a `QuantTargets` (or a mapping
      `QuantTargets.parse` takes).
    heads: output heads, left out of "all-linear".

  Raises:
    ValueError: unknown keys or values, a target matching nothing, a rank
      larger than a layer allows (checked when the layer is built).
  """
  linear_paths = list(linear_paths)
  lora = LoraTargets.parse(lora)
  quant = QuantTargets.parse(quant)
  lora_specs: dict[str, LoraSpec] = {}
  if lora is not None:
    chosen = select(linear_paths, lora.targets, heads, "lora.targets")
    excluded = set(select(linear_paths, lora.exclude, heads, "lora.exclude"))
    rank_pattern = dict(lora.rank_pattern)
    alpha_pattern = dict(lora.alpha_pattern)
    used: set = set()
    for p in chosen:
      if p in excluded:
        continue
      rank = _pattern_value(p, rank_pattern, lora.spec.rank, used)
      alpha = _pattern_value(p, alpha_pattern, lora.spec.alpha, used)
      lora_specs[p] = dataclasses.replace(
        lora.spec, rank=rank, alpha=float(alpha)
      )
    unused = (set(rank_pattern) | set(alpha_pattern)) - used
    if unused:
      raise ValueError(
        f"lora rank_pattern/alpha_pattern {sorted(unused)} match no adapted "
        "layer"
      )
  quant_specs: dict[str, QuantSpec] = {}
  if quant is not None:
    chosen = select(linear_paths, quant.targets, heads, "quant.targets")
    excluded = set(select(linear_paths, quant.exclude, heads, "quant.exclude"))
    quant_specs = {p: quant.spec for p in chosen if p not in excluded}
  layers = []
  for p in linear_paths:
    spec = LayerSpec(lora_specs.get(p), quant_specs.get(p))
    if spec != LayerSpec():
      layers.append((p, spec))
  return Plan(tuple(layers))


_SPEC_KEYS = tuple(f.name for f in dataclasses.fields(LoraSpec))
_LORA_KEYS = _SPEC_KEYS + (
  "targets",
  "exclude",
  "rank_pattern",
  "alpha_pattern",
)
_QSPEC_KEYS = tuple(f.name for f in dataclasses.fields(QuantSpec))
_QUANT_KEYS = _QSPEC_KEYS + ("targets", "exclude")


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
