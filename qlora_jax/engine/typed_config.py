"""A nested mapping read into typed dataclasses, field by field.

`read_section` turns one section of a config (a mapping) into its
dataclass: unknown and missing fields, values of the wrong type (a
fractional int, a string where a number belongs) are errors naming
"section.field", and a `SpecError` the dataclass raises for one of its
fields gets the section's prefix. Ints must be whole, bools real bools.
"""

import dataclasses
import types
import typing
from collections.abc import Mapping
from typing import Any

from qlora_jax.quant import SpecError


class ConfigError(ValueError):
  """Config fields that are missing, unknown, mistyped or out of range."""


def plain(cfg: Any) -> Any:
  """ConfigDict / FrozenConfigDict -> plain dicts and lists."""
  if hasattr(cfg, "to_dict"):
    cfg = cfg.to_dict()
  if isinstance(cfg, Mapping):
    return {k: plain(v) for k, v in cfg.items()}
  if isinstance(cfg, (list, tuple)):
    return [plain(v) for v in cfg]
  return cfg


def read_section(name: str, kind, values: Mapping, errors: list[str]):
  hints = typing.get_type_hints(kind)
  fields = [f.name for f in dataclasses.fields(kind)]
  for key in sorted(set(values) - set(fields)):
    errors.append(f"{name}.{key}: unknown config field")
  out = {}
  for field in fields:
    where = f"{name}.{field}"
    if field not in values:
      errors.append(f"{where}: missing from the config")
      continue
    try:
      out[field] = _coerce(values[field], hints[field], where)
    except ConfigError as e:
      errors.append(str(e))
  if len(out) != len(fields):
    return None
  try:
    return kind(**out)
  except SpecError as e:
    errors.append(f"{name}.{e.field}: {e.reason}")
    return None


def _coerce(value: Any, hint: Any, where: str) -> Any:
  """`value` as type `hint`; ints must be whole, bools real bools."""
  if isinstance(hint, types.UnionType):
    kinds = typing.get_args(hint)
    if value is None and type(None) in kinds:
      return None
    last = None
    for kind in kinds:
      if kind is type(None):
        continue
      try:
        return _coerce(value, kind, where)
      except ConfigError as e:
        last = e
    raise last
  if hint is bool:
    if isinstance(value, bool):
      return value
  elif hint is int:
    if isinstance(value, int) and not isinstance(value, bool):
      return value
    if isinstance(value, float) and value.is_integer():
      return int(value)
    if isinstance(value, float):
      raise ConfigError(f"{where}: expected a whole number, got {value!r}")
  elif hint is float:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
      return float(value)
  elif hint is str:
    if isinstance(value, str):
      return value
  elif hint is list:
    if isinstance(value, (list, tuple)):
      return list(value)
  elif hint is dict:
    if isinstance(value, Mapping):
      return dict(value)
  name = getattr(hint, "__name__", str(hint))
  raise ConfigError(
    f"{where}: expected {name}, got {type(value).__name__} {value!r}"
  )
