"""The label map of a classification run: sorted training labels -> ids.

Saved with the run as a JSON object `{"label": id, ...}` whose ids are
0..n-1 in the sorted order of the labels.
"""

import bisect
import dataclasses
import json
import os
from collections.abc import Iterable, Mapping, Sequence

import numpy as np

from qlora_jax.data.readers import ClassificationExample

_SHOWN_LABELS = 20  # how many known labels an unknown-label error lists


@dataclasses.dataclass(frozen=True)
class LabelMap:
  """Label names in id order (sorted); `names[i]` has id i."""

  names: tuple[str, ...]

  def __post_init__(self):
    if not self.names:
      raise ValueError("a label map needs at least one label")
    for name in self.names:
      if not isinstance(name, str):
        raise ValueError(f"labels must be strings, got {name!r}")
    if list(self.names) != sorted(set(self.names)):
      raise ValueError(
        f"label names must be unique and sorted, got {list(self.names)}"
      )

  @classmethod
  def from_labels(cls, labels: Iterable[str]) -> "LabelMap":
    return cls(tuple(sorted(set(labels))))

  @classmethod
  def from_examples(
    cls, examples: Iterable[ClassificationExample]
  ) -> "LabelMap":
    """The sorted unique labels of (training) examples."""
    return cls.from_labels(e.label for e in examples)

  def __len__(self) -> int:
    return len(self.names)

  def id(self, label: str, where: str = "") -> int:
    """The id of `label`; an unknown one raises naming `where`."""
    index = bisect.bisect_left(self.names, label)
    if index < len(self.names) and self.names[index] == label:
      return index
    known = ", ".join(f'"{n}"' for n in self.names[:_SHOWN_LABELS])
    if len(self.names) > _SHOWN_LABELS:
      known += f", ... ({len(self.names)} in all)"
    prefix = f"{where}: " if where else ""
    raise ValueError(
      f'{prefix}unknown label "{label}" (the training labels are {known})'
    )

  def ids(self, examples: Sequence[ClassificationExample]) -> np.ndarray:
    """int32 ids of the examples' labels; an unknown one names its line."""
    return np.asarray([self.id(e.label, e.where) for e in examples], np.int32)

  def name(self, label_id: int) -> str:
    if not 0 <= label_id < len(self.names):
      raise ValueError(f"label id {label_id} is not in [0, {len(self.names)})")
    return self.names[label_id]

  def to_dict(self) -> dict[str, int]:
    """JSON-serialisable {label: id}."""
    return {name: i for i, name in enumerate(self.names)}

  @classmethod
  def from_dict(
    cls, mapping: Mapping[str, int], source: str = ""
  ) -> "LabelMap":
    """Inverse of `to_dict`; checks that ids are 0..n-1 in sorted order."""
    prefix = f"{source}: " if source else ""
    if not isinstance(mapping, Mapping) or not mapping:
      raise ValueError(
        f"{prefix}a label map is a non-empty object {{label: id}}"
      )
    for name, label_id in mapping.items():
      if not isinstance(name, str):
        raise ValueError(f"{prefix}label {name!r} is not a string")
      if isinstance(label_id, bool) or not isinstance(label_id, int):
        raise ValueError(
          f'{prefix}label "{name}" has a non-integer id {label_id!r}'
        )
    names = tuple(sorted(mapping))
    expected = {name: i for i, name in enumerate(names)}
    if dict(mapping) != expected:
      raise ValueError(
        f"{prefix}label ids must be 0..{len(names) - 1} in sorted label order, "
        f"got {dict(mapping)}"
      )
    return cls(names)

  def save(self, path: str | os.PathLike) -> None:
    with open(path, "w", encoding="utf-8") as f:
      json.dump(self.to_dict(), f, indent=2, ensure_ascii=False)
      f.write("\n")

  @classmethod
  def load(cls, path: str | os.PathLike) -> "LabelMap":
    with open(path, encoding="utf-8") as f:
      try:
        mapping = json.load(f)
      except json.JSONDecodeError as e:
        raise ValueError(f"{path}: invalid JSON ({e})") from e
    return cls.from_dict(mapping, source=str(path))
