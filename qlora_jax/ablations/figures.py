"""Figures of a sweep (matplotlib PNGs, byte-identical when re-made).

Figure specs in a sweep's table.json:
  {"kind": "curves", "file": ..., "metric": "loss", "records": "eval"}:
    curves per row (mean over seeds) from each point's metrics.jsonl, of
    its eval records or, with "records": "train", its training steps';
  {"kind": "xy", "file": ..., "x": key or metric, "y": metric,
   "series": key or [keys], "series_patterns": {key: regex}, "logx": bool,
   "logy": bool}: y against x (a config key such as "lora.rank" or a
    metric such as "bits_per_param"), one line per value of `series` (the
    values of several keys joined; a key's pattern keeps only the part of
    its value the regex matches first, e.g. "^[a-z]+" makes "nf3" "nf"),
    mean +- std over seeds as error bars.
"""

import pathlib
import re

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from qlora_jax.ablations import results  # noqa: E402
from qlora_jax.engine import outputs  # noqa: E402
from qlora_jax.engine.metrics import read_metrics  # noqa: E402

_META = {"Software": None}  # no version stamp: same inputs, same bytes


def _label(group: dict) -> str:
  return " / ".join(group["row"])


def curves(spec: dict, fig_spec: dict, points: list[dict], path) -> None:
  metric = fig_spec.get("metric", "loss")
  kind = fig_spec.get("records", "eval")
  groups = results.group_points(points, list(spec["rows"]))
  fig, ax = plt.subplots(figsize=(7, 4.5))
  for g in groups:
    runs = []
    for r in g["runs"]:
      records = read_metrics(r["dir"] / "metrics.jsonl")
      evals = [x for x in records if x["kind"] == kind and metric in x]
      runs.append(([x["step"] for x in evals], [x[metric] for x in evals]))
    steps = runs[0][0]
    if any(s != steps for s, _ in runs) or not steps:
      continue
    mean = np.mean([v for _, v in runs], axis=0)
    ax.plot(steps, mean, marker="o", markersize=3, label=_label(g))
  ax.set_xlabel("step")
  ax.set_ylabel(f"{kind} {metric}")
  ax.set_title(spec["title"], fontsize=9)
  ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=100, metadata=_META)
  plt.close(fig)


def _value(group: dict, run: dict, key: str):
  if key in group["keys"]:
    return group["keys"][key]
  return run["metrics"].get(key)


def _series_name(group: dict, keys: list[str], patterns: dict) -> str:
  parts = []
  for key in keys:
    shown = results.show_value(group["keys"].get(key, ""))
    match = re.search(patterns[key], shown) if key in patterns else None
    parts.append(match.group(0) if match else shown)
  return " ".join(parts)


def _series_keys(fig_spec: dict) -> list[str]:
  series = fig_spec.get("series") or []
  return [series] if isinstance(series, str) else list(series)


def xy_lines(spec: dict, fig_spec: dict, points: list[dict]) -> dict:
  """{series name: sorted [(x, mean y, std y)]} of an "xy" figure."""
  x_key, y_key = fig_spec["x"], fig_spec["y"]
  series_keys = _series_keys(fig_spec)
  patterns = fig_spec.get("series_patterns", {})
  lines: dict[str, list] = {}
  for g in results.group_points(points, list(spec["rows"])):
    name = _series_name(g, series_keys, patterns)
    xs = [_value(g, r, x_key) for r in g["runs"]]
    ys = [r["metrics"].get(y_key) for r in g["runs"]]
    if any(v is None for v in xs + ys):
      continue
    mean, std, _ = results.stats(ys)
    lines.setdefault(name, []).append((float(np.mean(xs)), mean, std))
  return {name: sorted(pts) for name, pts in lines.items()}


def xy(spec: dict, fig_spec: dict, points: list[dict], path) -> None:
  x_key, y_key = fig_spec["x"], fig_spec["y"]
  series_keys = _series_keys(fig_spec)
  lines = xy_lines(spec, fig_spec, points)
  fig, ax = plt.subplots(figsize=(6, 4.2))
  for name, pts in lines.items():
    x, y, e = (np.array(v) for v in zip(*pts, strict=True))
    ax.errorbar(x, y, yerr=e, marker="o", markersize=4, capsize=3, label=name)
  if fig_spec.get("logx"):
    ax.set_xscale("log", base=2)
  if fig_spec.get("logy"):
    ax.set_yscale("log")
  ax.set_xlabel(x_key.split(".")[-1])
  ax.set_ylabel(y_key)
  ax.set_title(spec["title"], fontsize=9)
  if series_keys:
    title = " / ".join(k.split(".")[-1] for k in series_keys)
    ax.legend(title=title, fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=100, metadata=_META)
  plt.close(fig)


def write_all(
  spec: dict, points: list[dict], out: pathlib.Path, keep_off=()
) -> list:
  """Every figure of `spec` into `out`, each file replaced whole."""
  written = []
  for fig_spec in spec.get("figures", []):
    path = out / fig_spec["file"]
    draw = {"curves": curves, "xy": xy}[fig_spec["kind"]]
    with outputs.writing(
      path, folder=False, overwrite=True, keep_off=keep_off
    ) as tmp:
      draw(spec, fig_spec, points, tmp)
    written.append(path)
  return written
