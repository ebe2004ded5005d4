"""A sweep's results as Markdown and LaTeX tables (mean +- 95% CI, n).

The layout comes from the sweep's `table.json` (a config's `get_table()`):

  title:    the caption
  rows:     labels / overrides that name a row, in order of appearance
  columns:  optional key whose values become columns (a grid of the first
            metric); without it, each metric is a column
  metrics:  [key, header, format] with format one of pct, f3, f4, int,
            mib, bits, sci
  figures:  see qlora_jax/figures.py
  best:     optional {"over": key, "metric": [key, header, format],
            "reference": row label}: a second table with, for each row
            without `over` (a learning rate, say), the value of `over`
            whose mean metric is highest, that mean +- its interval, and
            its ratio to the reference row's best value of `over`

Points that differ only in `train.seed` are one row: the mean +- the
half-width of its 95% Student t interval over seeds (`results.interval`;
no interval when every seed gave the same value), and the row's n (with
how many of them diverged, `results.diverged`). Output is a pure function
of the points' files, so re-running gives the same files: each replaces
its previous version whole (`engine.outputs`), never a file of the sweep.
"""

import json
import pathlib

from qlora_jax.ablations.results import (
  SWEEP_FILES,
  diverged,
  group_points,
  interval,
  load_points,
  show_value,
)
from qlora_jax.engine import outputs


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
  mean, half, n = interval(values)
  text = _format(mean, fmt)
  if n > 1 and fmt not in ("int", "bits") and len(set(values)) > 1:
    text += f" ± {_format(half, fmt)}"
  return text


def count(group: dict) -> str:
  """The row's n, and how many of its runs diverged."""
  n = len(group["runs"])
  bad = sum(diverged(r) is not None for r in group["runs"])
  return f"{n} ({bad} diverged)" if bad else str(n)


def _seeds(groups: list[dict]) -> str:
  counts = sorted({len(g["runs"]) for g in groups})
  return "/".join(str(c) for c in counts)


def table_rows(
  spec: dict, points: list[dict]
) -> tuple[list[str], list[list[str]]]:
  """(header, rows) of the table as strings."""
  row_keys = list(spec["rows"])
  metrics = [tuple(m) for m in spec["metrics"]]
  groups = group_points(points, row_keys)
  headers = [k.split(".")[-1] for k in row_keys]
  col_key = spec.get("columns")
  if not col_key:
    # n per row, unless every row is one run (then the note says so).
    counted = any(len(g["runs"]) > 1 or count(g) != "1" for g in groups)
    header = headers + [m[1] for m in metrics] + (["n"] if counted else [])
    rows = [
      list(g["row"])
      + [cell(g, m[0], m[2]) for m in metrics]
      + ([count(g)] if counted else [])
      for g in groups
    ]
    return header, rows
  key, _, fmt = metrics[0]
  columns: list[str] = []
  grid: dict[tuple, dict[str, str]] = {}
  for g in groups:
    col = show_value(g["keys"].get(col_key, ""))
    if col not in columns:
      columns.append(col)
    grid.setdefault(g["row"], {})[col] = cell(g, key, fmt)
  header = headers + [f"{col_key.split('.')[-1]}={c}" for c in columns]
  rows = [
    list(r) + [cells.get(c, "-") for c in columns] for r, cells in grid.items()
  ]
  return header, rows


def best_rows(
  spec: dict, points: list[dict]
) -> tuple[list[str], list[list[str]]]:
  """(header, rows) of the `best` table: per row label without the
  `over` key, its best value of `over` by the mean of the metric. Values
  whose means tie for the best are all shown, marked "(tied)", and a
  ratio to the reference's best is given only where both are single
  values ("tied" otherwise): a tie has no one best to divide by."""
  best = spec["best"]
  over = best["over"]
  key, name, fmt = best["metric"]
  row_keys = [k for k in spec["rows"] if k != over]
  chosen: dict[tuple, tuple[float, list[dict]]] = {}
  for g in group_points(points, list(spec["rows"])):
    values = [r["metrics"][key] for r in g["runs"] if key in r["metrics"]]
    if not values:
      continue
    label = tuple(show_value(g["keys"].get(k, "")) for k in row_keys)
    mean = interval(values)[0]
    if label not in chosen or mean > chosen[label][0]:
      chosen[label] = (mean, [g])
    elif mean == chosen[label][0]:
      chosen[label][1].append(g)
  reference = chosen.get((best.get("reference", ""),))
  short = over.split(".")[-1]
  header = [k.split(".")[-1] for k in row_keys] + [f"best {short}", name, "n"]
  if reference:
    header.append(f"{short} / {best['reference']}'s")
  rows = []
  for label, (_, groups) in chosen.items():
    g = groups[0]
    shown = " / ".join(show_value(t["keys"].get(over)) for t in groups)
    if len(groups) > 1:
      shown += " (tied)"
    row = [*label, shown, cell(g, key, fmt), count(g)]
    if reference:
      if len(groups) > 1 or len(reference[1]) > 1:
        row.append("tied")
      else:
        ratio = float(g["keys"][over]) / float(reference[1][0]["keys"][over])
        row.append(f"{ratio:.3g}")
    rows.append(row)
  return header, rows


def markdown(spec: dict, points: list[dict]) -> str:
  header, rows = table_rows(spec, points)
  groups = group_points(points, list(spec["rows"]))
  lines = [f"**{spec['title']}**", ""]
  lines.append("| " + " | ".join(header) + " |")
  lines.append("|" + "|".join("---" for _ in header) + "|")
  lines += ["| " + " | ".join(r) + " |" for r in rows]
  lines.append("")
  if all(len(g["runs"]) == 1 for g in groups):
    notes = ["one run per row (no interval)"]
  else:
    notes = [
      "mean ± half-width of the 95% confidence interval over seeds "
      f"(Student t; n = {_seeds(groups)} per row)"
    ]
  if spec.get("columns"):
    notes.append(f"cells: {spec['metrics'][0][1]}")
  lines.append("; ".join(notes) + ".")
  for p in points:
    why = diverged(p) if p["metrics"] is not None else None
    if why:
      lines.append(f"- diverged, counted in its row: `{p['dir'].name}`: {why}")
  failed = [p for p in points if p["metrics"] is None]
  for p in failed:
    what = p["error"] or "not finished"
    lines.append(f"- not in the table: `{p['dir'].name}`: {what}")
  if spec.get("best"):
    header, rows = best_rows(spec, points)
    over = spec["best"]["over"]
    lines += ["", f"**Best {over} of each row** (by the mean)", ""]
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "|".join("---" for _ in header) + "|")
    lines += ["| " + " | ".join(r) + " |" for r in rows]
  return "\n".join(lines) + "\n"


def _tex(text: str) -> str:
  out = text.replace("\\", "\\textbackslash{}")
  for ch in "&%$#_{}":
    out = out.replace(ch, "\\" + ch)
  return out.replace("±", "$\\pm$").replace("~", "\\textasciitilde{}")


def latex(spec: dict, points: list[dict]) -> str:
  header, rows = table_rows(spec, points)
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
  from qlora_jax.ablations import figures  # noqa: PLC0415 (matplotlib)

  sweep_dir = pathlib.Path(sweep_dir)
  spec = json.loads((sweep_dir / "table.json").read_text())
  out = pathlib.Path(out_dir) if out_dir else sweep_dir / "tables"
  points = load_points(sweep_dir)
  # The sweep's own files are inputs; the tables' are made anew each time.
  keep_off = [("the sweep's points", sweep_dir / "points")] + [
    ("a file of the sweep", sweep_dir / name) for name in SWEEP_FILES
  ]
  written = [out / "table.md", out / "table.tex"]
  for path, text in zip(written, (markdown, latex), strict=True):
    outputs.write_text(path, text(spec, points), keep_off=keep_off)
  written += figures.write_all(spec, points, out, keep_off)
  return written
