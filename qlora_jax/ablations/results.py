"""A sweep's points on disk: loading, grouping over seeds, statistics.

Every point of a sweep lives in `<sweep>/points/<slug>/` with its
`point.json` (labels and overrides), and when done its
`final_metrics.json`, or when failed its `error.txt`.

Tables report the mean over seeds with its two-sided 95% confidence
interval, mean +- t(0.975, n - 1) * s / sqrt(n) (Student t, s the sample
standard deviation), and n. A finished run whose eval loss is not finite,
or above the untrained model's, has diverged (`diverged`): it is counted
in n and the mean and named under the table, never dropped.
"""

import json
import math
import pathlib
from typing import Any

import numpy as np

from qlora_jax.engine.metrics import read_metrics

DONE = "final_metrics.json"
ERROR = "error.txt"
POINT = "point.json"
# A sweep folder's own files, beside its points/.
SWEEP_FILES = ("order.json", "table.json", "base_config.json")

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
      entry["metrics"].update(zero_shot(d))
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


def zero_shot(workdir: pathlib.Path) -> dict[str, float]:
  """{"zero_shot_<metric>": value} of a run's step-0 evaluation (the model
  before training), or {} when it made none."""
  path = workdir / "metrics.jsonl"
  if not path.is_file():
    return {}
  for r in read_metrics(path):
    if r["kind"] == "eval" and r["step"] == 0:
      return {
        f"zero_shot_{k}": float(v)
        for k, v in r.items()
        if k not in ("kind", "step") and isinstance(v, (int, float))
      }
  return {}


def untrained_loss(point: dict) -> float | None:
  """The eval loss of the point's model before training: its step-0
  evaluation when the run made one; for a classifier without one, ln(the
  number of classes), a uniform guess's loss; else None."""
  d = point["dir"]
  if (d / "metrics.jsonl").is_file():
    for r in read_metrics(d / "metrics.jsonl"):
      if r["kind"] == "eval" and r["step"] == 0 and "loss" in r:
        return float(r["loss"])
  labels = d / "labels.json"
  if labels.is_file():
    return math.log(len(json.loads(labels.read_text())))
  return None


def diverged(point: dict) -> str | None:
  """Why a finished point counts as diverged, or None."""
  loss = (point.get("metrics") or {}).get("loss")
  if loss is None:
    return None
  if not math.isfinite(loss):
    return f"eval loss {loss}"
  base = untrained_loss(point)
  if base is not None and loss > base:
    return f"eval loss {loss:.4f} above the untrained model's {base:.4f}"
  return None


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


# Student t quantiles t(0.975, df) for df = 1..30 (two-sided 95%).
_T975 = (
  12.706205,
  4.302653,
  3.182446,
  2.776445,
  2.570582,
  2.446912,
  2.364624,
  2.306004,
  2.262157,
  2.228139,
  2.200985,
  2.178813,
  2.160369,
  2.144787,
  2.131450,
  2.119905,
  2.109816,
  2.100922,
  2.093024,
  2.085963,
  2.079614,
  2.073873,
  2.068658,
  2.063899,
  2.059539,
  2.055529,
  2.051831,
  2.048407,
  2.045230,
  2.042272,
)


def t_quantile(df: int) -> float:
  """t(0.975, df): tabulated to df 30, then the Cornish-Fisher expansion
  around the normal quantile (error below 1e-4 there)."""
  if df < 1:
    raise ValueError(f"degrees of freedom must be >= 1, got {df}")
  if df <= len(_T975):
    return _T975[df - 1]
  z = 1.959964
  return (
    z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)
  )


def interval(values: list[float]) -> tuple[float, float, int]:
  """(mean, half-width of the 95% Student t interval, n); the half-width
  is nan for a single value."""
  n = len(values)
  if n == 0:
    return float("nan"), float("nan"), 0
  mean = sum(values) / n
  if n == 1:
    return mean, float("nan"), 1
  var = sum((v - mean) ** 2 for v in values) / (n - 1)
  return mean, t_quantile(n - 1) * (var / n) ** 0.5, n
