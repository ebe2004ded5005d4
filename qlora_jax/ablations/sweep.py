"""Sweeps: a grid of config overrides, one workdir and one process per point.

A config file defines `get_sweep()`: a list of points, each a dict of
dotted config overrides ("lora.rank": 16) and labels (keys without a dot,
such as "method": "QLoRA NF4"). A point's name is its labels and overrides
joined ("method=qlora_nf4,train.seed=1"), its workdir `<sweep>/points/<slug>`.

Running a sweep is resumable: a point with a `final_metrics.json` is done
and skipped; an interrupted point resumes from its checkpoint (the training
engine does that); a failing point writes `error.txt` and the sweep moves
on (it is retried on the next run). Each point runs in a fresh process, so
a crash or a leak in one cannot take the others down. A sweep holds a lock
on its folder (`engine.outputs.Lock`) while it runs: a second sweep there
is refused at once, before it writes anything.
"""

import dataclasses
import importlib.util
import json
import multiprocessing
import os
import pathlib
import re
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from ml_collections import config_dict

from qlora_jax.ablations.results import DONE, ERROR, POINT
from qlora_jax.engine import outputs


def config_module(path: str | pathlib.Path):
  """A config file as a module (its get_config, get_sweep, get_table...)."""
  spec = importlib.util.spec_from_file_location("sweep_config", str(path))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@dataclasses.dataclass(frozen=True)
class Point:
  labels: dict[str, Any]
  overrides: dict[str, Any]

  @property
  def name(self) -> str:
    items = list(self.labels.items()) + list(self.overrides.items())
    return ",".join(f"{k}={_text(v)}" for k, v in items)

  @property
  def slug(self) -> str:
    return re.sub(r"[^A-Za-z0-9_.=,+-]+", "_", self.name)[:200]


def _text(v: Any) -> str:
  if isinstance(v, (list, tuple)):
    return "+".join(_text(x) for x in v) or "none"
  return str(v)


def points_of(sweep: Sequence[Mapping[str, Any]]) -> list[Point]:
  """Splits each sweep entry into labels and dotted overrides."""
  points = []
  for entry in sweep:
    labels = {k: v for k, v in entry.items() if "." not in k}
    overrides = {k: v for k, v in entry.items() if "." in k}
    points.append(Point(labels, overrides))
  slugs = [p.slug for p in points]
  dupes = sorted({s for s in slugs if slugs.count(s) > 1})
  if dupes:
    raise ValueError(f"sweep points with the same name: {dupes}")
  return points


def apply_overrides(
  config: config_dict.ConfigDict, overrides: Mapping[str, Any]
) -> config_dict.ConfigDict:
  """A copy of `config` with dotted overrides; unknown fields raise."""
  config = config_dict.ConfigDict(config.to_dict())
  for key, value in overrides.items():
    node = config
    *parents, leaf = key.split(".")
    for part in parents:
      if part not in node:
        raise ValueError(f"sweep override {key!r}: no config field {part!r}")
      node = node[part]
    if leaf not in node:
      raise ValueError(f"sweep override {key!r}: no config field {leaf!r}")
    old = node[leaf]
    if isinstance(old, str | list | tuple) and isinstance(value, list | tuple):
      # Fields such as lora.targets take a string or a list of names.
      with node.ignore_type():
        node[leaf] = list(value)
    else:
      node[leaf] = value
  return config


def _child(config_json: str, workdir: str, log_path: str) -> None:
  """Runs one point (in a spawned process), its output going to a log."""
  fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
  os.dup2(fd, 1)
  os.dup2(fd, 2)
  from qlora_jax.engine import train  # noqa: PLC0415

  config = config_dict.ConfigDict(json.loads(config_json))
  try:
    train.train_and_evaluate(config, workdir)
  except BaseException:
    outputs.write_text(pathlib.Path(workdir) / ERROR, traceback.format_exc())
    raise


def run_point(config: config_dict.ConfigDict, workdir: pathlib.Path) -> bool:
  """Trains one point in a fresh process; True when it finished."""
  workdir.mkdir(parents=True, exist_ok=True)
  (workdir / ERROR).unlink(missing_ok=True)
  ctx = multiprocessing.get_context("spawn")
  proc = ctx.Process(
    target=_child,
    args=(config.to_json(), str(workdir), str(workdir / "log.txt")),
  )
  proc.start()
  proc.join()
  if proc.exitcode != 0 and not (workdir / ERROR).exists():
    outputs.write_text(
      workdir / ERROR,
      f"the point's process ended with exit code {proc.exitcode}\n",
    )
  return (workdir / DONE).exists() and proc.exitcode == 0


def status(workdir: pathlib.Path) -> str:
  if (workdir / DONE).exists():
    return "done"
  if (workdir / ERROR).exists():
    return "failed"
  if (workdir / "checkpoints").exists():
    return "interrupted"
  return "new"


def write_layout(
  sweep_dir: pathlib.Path, points: Sequence[Point], table: Mapping | None
) -> None:
  """The sweep's order of points and its table spec (for `tables`)."""
  (sweep_dir / "points").mkdir(parents=True, exist_ok=True)
  outputs.write_text(
    sweep_dir / "order.json", json.dumps([p.slug for p in points], indent=1)
  )
  if table is not None:
    outputs.write_text(sweep_dir / "table.json", json.dumps(table, indent=2))


def write_point(workdir: pathlib.Path, point: Point) -> None:
  workdir.mkdir(parents=True, exist_ok=True)
  record = {"labels": point.labels, "overrides": point.overrides}
  outputs.write_text(workdir / POINT, json.dumps(record, indent=2))


def run_sweep(
  config: config_dict.ConfigDict,
  sweep: Sequence[Mapping[str, Any]],
  sweep_dir: str | pathlib.Path,
  table: Mapping | None = None,
  runner: Callable[[config_dict.ConfigDict, pathlib.Path], bool] = run_point,
  echo: Callable[[str], None] = print,
) -> dict[str, str]:
  """Runs every point not yet done; returns {point name: final status}.

  Raises:
    OutputError: another sweep is running in `sweep_dir`.
  """
  sweep_dir = pathlib.Path(sweep_dir)
  points = points_of(sweep)
  sweep_dir.mkdir(parents=True, exist_ok=True)
  with outputs.Lock(sweep_dir.resolve(), flag="--workdir"):
    return _run_points(config, points, sweep_dir, table, runner, echo)


def _run_points(config, points, sweep_dir, table, runner, echo):
  write_layout(sweep_dir, points, table)
  outputs.write_text(sweep_dir / "base_config.json", config.to_json(indent=2))
  results = {}
  for i, point in enumerate(points, 1):
    workdir = sweep_dir / "points" / point.slug
    before = status(workdir)
    head = f"[{i}/{len(points)}] {point.name}"
    if before == "done":
      echo(f"{head}: done, skipped")
      results[point.name] = "done"
      continue
    write_point(workdir, point)
    point_config = apply_overrides(config, point.overrides)
    start = time.perf_counter()
    echo(f"{head}: {'resuming' if before == 'interrupted' else 'running'}")
    ok = runner(point_config, workdir)
    seconds = time.perf_counter() - start
    if ok:
      final = json.loads((workdir / DONE).read_text())
      shown = ", ".join(
        f"{k} {final[k]:.4f}" for k in ("accuracy", "loss") if k in final
      )
      echo(f"{head}: done in {seconds:.0f} s ({shown})")
      results[point.name] = "done"
    else:
      last = (workdir / ERROR).read_text().strip().splitlines()[-1:]
      echo(f"{head}: FAILED in {seconds:.0f} s: {' '.join(last)}")
      results[point.name] = "failed"
  done = sum(v == "done" for v in results.values())
  echo(f"sweep: {done}/{len(points)} points done, in {sweep_dir}")
  return results
