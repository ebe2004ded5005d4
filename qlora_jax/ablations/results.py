"""A sweep's points on disk: loading, grouping over seeds, statistics.

Every point of a sweep lives in `<sweep>/points/<slug>/` with its
`point.json` (labels and overrides), and when done its
`final_metrics.json`, or when failed its `error.txt`.
"""

import json
import pathlib
from typing import Any

import numpy as np

DONE = "final_metrics.json"
ERROR = "error.txt"
POINT = "point.json"

SEED_KEY = "train.seed"


def load_points(sweep_dir: str | pathlib.Path) -> list[dict]:
  """Every point of a sweep, in the sweep's order, with its metrics."""
  sweep_dir = pathlib.Path(sweep_dir)
  order_file = sweep_dir / "order.json"
  if order_file.exists():
    names = json.loads(order_file.read_text())
    dirs = [sweep_dir / "points" / n for n in names]
  else:
    dirs = sorted(p for p in (sweep_dir / "points").iterdir() if p.is_dir())
  points = []
  for d in dirs:
    if not (d / POINT).exists():
      continue
    point = json.loads((d / POINT).read_text())
    keys = {**point["labels"], **point["overrides"]}
    entry = {"dir": d, "keys": keys, "metrics": None, "error": None}
    if (d / DONE).exists():
      entry["metrics"] = json.loads((d / DONE).read_text())
    elif (d / ERROR).exists():
      lines = (d / ERROR).read_text().strip().splitlines()
      entry["error"] = lines[-1] if lines else "failed"
    points.append(entry)
  return points


def group_points(points: list[dict], row_keys: list[str]) -> list[dict]:
  """Done points grouped by everything but the seed, in order."""
  groups: dict[tuple, dict] = {}
  for p in points:
    if p["metrics"] is None:
      continue
    key = tuple(
      (k, json.dumps(v, sort_keys=True))
      for k, v in p["keys"].items()
      if k != SEED_KEY
    )
    g = groups.setdefault(
      key,
      {
        "keys": {k: v for k, v in p["keys"].items() if k != SEED_KEY},
        "row": tuple(show_value(p["keys"].get(k, "")) for k in row_keys),
        "runs": [],
      },
    )
    g["runs"].append(p)
  return list(groups.values())


def show_value(v: Any) -> str:
  """A config value as a table cell or series name."""
  if isinstance(v, (list, tuple)):
    return "{" + ", ".join(str(x) for x in v) + "}"
  if isinstance(v, bool):
    return "yes" if v else "no"
  return str(v)


def stats(values: list[float]) -> tuple[float, float, int]:
  """(mean, sample std (0 for one value), count)."""
  arr = np.asarray(values, np.float64)
  std = float(arr.std(ddof=1)) if len(arr) > 1 else 0.0
  return float(arr.mean()), std, len(arr)
