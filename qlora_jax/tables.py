"""A sweep's results as Markdown and LaTeX tables (mean +- std over seeds).

The layout comes from the sweep's `table.json` (a config's `get_table()`):

  title:    the caption
  rows:     labels / overrides that name a row, in order of appearance
  columns:  optional key whose values become columns (a grid of the first
            metric); without it, each metric is a column
  metrics:  [key, header, format] with format one of pct, f3, f4, int,
            mib, bits, sci
  figures:  see qlora_jax/figures.py

Points that differ only in `train.seed` are one row: the mean +- the
sample standard deviation over seeds (with the seed count). Output is a
pure function of the points' files, so re-running gives the same files.
"""

import json
import pathlib
from typing import Any

import numpy as np

from qlora_jax.sweep import DONE, ERROR, POINT

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
        "row": tuple(_show(p["keys"].get(k, "")) for k in row_keys),
        "runs": [],
      },
    )
    g["runs"].append(p)
  return list(groups.values())


def _show(v: Any) -> str:
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


def _format(value: float, fmt: str) -> str:
  if fmt == "pct":
    return f"{100 * value:.1f}"
  if fmt == "int":
    return f"{int(round(value)):,}"
  if fmt == "mib":
    return f"{value / 2**20:,.1f}"
  if fmt == "bits":
    return f"{value:.3f}"
  if fmt == "sci":
    return f"{value:.2e}"
  digits = int(fmt[1:]) if fmt.startswith("f") else 4
  return f"{value:.{digits}f}"


def cell(group: dict, key: str, fmt: str) -> str:
  values = [r["metrics"][key] for r in group["runs"] if key in r["metrics"]]
  if not values:
    return "-"
  mean, std, n = stats(values)
  text = _format(mean, fmt)
  if n > 1 and fmt not in ("int", "bits"):
    text += f" ± {_format(std, fmt)}"
  return text


def _seeds(groups: list[dict]) -> str:
  counts = sorted({len(g["runs"]) for g in groups})
  return "/".join(str(c) for c in counts)


def build(spec: dict, points: list[dict]) -> tuple[list[str], list[list[str]]]:
  """(header, rows) of the table as strings."""
  row_keys = list(spec["rows"])
  metrics = [tuple(m) for m in spec["metrics"]]
  groups = group_points(points, row_keys)
  headers = [k.split(".")[-1] for k in row_keys]
  col_key = spec.get("columns")
  if not col_key:
    header = headers + [m[1] for m in metrics]
    rows = [
      list(g["row"]) + [cell(g, m[0], m[2]) for m in metrics] for g in groups
    ]
    return header, rows
  key, _, fmt = metrics[0]
  columns: list[str] = []
  grid: dict[tuple, dict[str, str]] = {}
  for g in groups:
    col = _show(g["keys"].get(col_key, ""))
    if col not in columns:
      columns.append(col)
    grid.setdefault(g["row"], {})[col] = cell(g, key, fmt)
  header = headers + [f"{col_key.split('.')[-1]}={c}" for c in columns]
  rows = [
    list(r) + [cells.get(c, "-") for c in columns] for r, cells in grid.items()
  ]
  return header, rows


def markdown(spec: dict, points: list[dict]) -> str:
  header, rows = build(spec, points)
  groups = group_points(points, list(spec["rows"]))
  lines = [f"**{spec['title']}**", ""]
  lines.append("| " + " | ".join(header) + " |")
  lines.append("|" + "|".join("---" for _ in header) + "|")
  lines += ["| " + " | ".join(r) + " |" for r in rows]
  lines.append("")
  notes = [f"mean ± std over seeds ({_seeds(groups)} per row)"]
  if spec.get("columns"):
    notes.append(f"cells: {spec['metrics'][0][1]}")
  lines.append("; ".join(notes) + ".")
  failed = [p for p in points if p["metrics"] is None]
  for p in failed:
    what = p["error"] or "not finished"
    lines.append(f"- not in the table: `{p['dir'].name}`: {what}")
  return "\n".join(lines) + "\n"


def _tex(text: str) -> str:
  out = text.replace("\\", "\\textbackslash{}")
  for ch in "&%$#_{}":
    out = out.replace(ch, "\\" + ch)
  return out.replace("±", "$\\pm$").replace("~", "\\textasciitilde{}")


def latex(spec: dict, points: list[dict]) -> str:
  header, rows = build(spec, points)
  n_rows = len(spec["rows"])
  align = "l" * n_rows + "r" * (len(header) - n_rows)
  lines = [
    "\\begin{table}[t]",
    "\\centering",
    f"\\caption{{{_tex(spec['title'])}}}",
    f"\\begin{{tabular}}{{{align}}}",
    "\\toprule",
    " & ".join(_tex(h) for h in header) + " \\\\",
    "\\midrule",
  ]
  lines += [" & ".join(_tex(c) for c in r) + " \\\\" for r in rows]
  lines += ["\\bottomrule", "\\end{tabular}", "\\end{table}"]
  return "\n".join(lines) + "\n"


def write(sweep_dir: str | pathlib.Path, out_dir=None) -> list[pathlib.Path]:
  """Writes table.md, table.tex and the figures; returns their paths."""
  from qlora_jax import figures  # noqa: PLC0415 (matplotlib only here)

  sweep_dir = pathlib.Path(sweep_dir)
  spec = json.loads((sweep_dir / "table.json").read_text())
  out = pathlib.Path(out_dir) if out_dir else sweep_dir / "tables"
  out.mkdir(parents=True, exist_ok=True)
  points = load_points(sweep_dir)
  written = [out / "table.md", out / "table.tex"]
  written[0].write_text(markdown(spec, points))
  written[1].write_text(latex(spec, points))
  written += figures.write_all(spec, points, out)
  return written
