"""Metrics of a run: JSONL, TensorBoard event files, the curves' figure."""

import json
import math
import pathlib
from typing import Any

import jax
from absl import logging

from qlora_jax.engine.workdir import write_atomic


class MetricsWriter:
  """Appends one JSON object per record to `metrics.jsonl` and writes the
  scalars to TensorBoard (tensorboardX) in the same workdir. Only process 0
  writes.

  A run resumed from checkpoint `resumed_from` redoes the steps after it:
  their records from before (a run killed after logging them) are dropped
  from `metrics.jsonl` and hidden from TensorBoard, so that each step has
  one record. A run that starts from no checkpoint (None) drops them all.
  """

  def __init__(self, workdir: str | pathlib.Path, resumed_from: int | None):
    self.path = pathlib.Path(workdir) / "metrics.jsonl"
    self._active = jax.process_index() == 0
    self._tb = None
    if self._active:
      _drop_torn_tail(self.path)
      _drop_steps_after(self.path, resumed_from)
      from tensorboardX import SummaryWriter  # noqa: PLC0415

      purge = 0 if resumed_from is None else resumed_from + 1
      self._tb = SummaryWriter(
        str(pathlib.Path(workdir) / "tensorboard"), purge_step=purge
      )

  def write(self, kind: str, step: int, values: dict[str, Any]) -> None:
    if not self._active:
      return
    record = {"kind": kind, "step": int(step)}
    record.update({k: _plain(v) for k, v in values.items()})
    with self.path.open("a") as f:
      f.write(json.dumps(record) + "\n")
    for k, v in record.items():
      if isinstance(v, (int, float)) and k != "step":
        self._tb.add_scalar(f"{kind}/{k}", v, step)

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()


def _drop_torn_tail(path: pathlib.Path) -> None:
  """Cuts a last line without its newline (a write cut short by a kill),
  so that appended records start on a line of their own."""
  if not path.is_file():
    return
  data = path.read_bytes()
  if not data or data.endswith(b"\n"):
    return
  keep = data.rfind(b"\n") + 1
  logging.warning(
    "%s: dropped a torn last line (%d bytes)", path, len(data) - keep
  )
  with path.open("r+b") as f:
    f.truncate(keep)


def _drop_steps_after(path: pathlib.Path, step: int | None) -> None:
  """Rewrites `path` (atomically) without its records of steps after
  `step` (every record when None), which the run is about to redo."""
  if not path.is_file():
    return
  lines = path.read_text().splitlines(keepends=True)
  keep = []
  for number, line in enumerate(lines, 1):
    if not line.strip():
      continue
    try:
      recorded = json.loads(line)["step"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
      raise ValueError(f"{path}:{number}: not a metrics record: {e}") from e
    if step is not None and recorded <= step:
      keep.append(line)
  if len(keep) == len(lines):
    return
  logging.info(
    "%s: dropped %d records of steps after %s, to be redone",
    path,
    len(lines) - len(keep),
    step,
  )
  write_atomic(path, "".join(keep))


def _plain(v: Any) -> Any:
  if hasattr(v, "item"):
    v = v.item()
  if isinstance(v, float) and not math.isfinite(v):
    return str(v)
  return v


def read_metrics(path: str | pathlib.Path) -> list[dict]:
  """Records of a metrics.jsonl; a step logged twice (a resumed run redoes
  the steps after its last checkpoint) keeps its last record.

  A torn last line (a kill during a write) is dropped with a warning; a
  bad line before it is an error naming the file and line.
  """
  path = pathlib.Path(path)
  latest: dict[tuple[str, int], dict] = {}
  lines = path.read_text().splitlines()
  for number, line in enumerate(lines, 1):
    if not line.strip():
      continue
    try:
      r = json.loads(line)
      latest[(r["kind"], r["step"])] = r
    except (json.JSONDecodeError, KeyError, TypeError) as e:
      if number == len(lines):
        logging.warning("%s:%d: dropped a torn last line", path, number)
        continue
      raise ValueError(f"{path}:{number}: not a metrics record: {e}") from e
  return sorted(latest.values(), key=lambda r: (r["step"], r["kind"]))


def plot_curves(records: list[dict], path: str | pathlib.Path) -> None:
  """A PNG of the train loss per logged step, the eval loss and the eval
  metric per eval, and the lm-eval tasks' metrics (matplotlib, no
  display)."""
  import matplotlib  # noqa: PLC0415 (only runs that finish need it)

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # noqa: PLC0415

  train = [r for r in records if r["kind"] == "train"]
  evals = [r for r in records if r["kind"] == "eval"]
  metric = next(
    (
      k for k in ("accuracy", "perplexity", "pass@1") if evals and k in evals[0]
    ),
    None,
  )
  tasks = sorted(
    {k for r in evals for k in r if "/" in k and "stderr" not in k}
  )
  panels = 1 + bool(metric) + bool(tasks)
  fig, axes = plt.subplots(1, panels, figsize=(5 * panels, 4))
  axes = list(axes) if panels > 1 else [axes]
  ax = axes.pop(0)
  ax.plot([r["step"] for r in train], [r["loss"] for r in train], label="train")
  if evals and "loss" in evals[0]:  # GRPO's evaluation has none
    ax.plot(
      [r["step"] for r in evals],
      [r["loss"] for r in evals],
      "o-",
      label="eval",
    )
  ax.set_xlabel("step")
  ax.set_ylabel("loss")
  ax.legend()
  if metric:
    ax = axes.pop(0)
    ax.plot([r["step"] for r in evals], [r[metric] for r in evals], "o-")
    ax.set_xlabel("step")
    ax.set_ylabel(f"eval {metric}")
  if tasks:  # lm-eval task metrics ("task/metric"), the zero-shot row too
    ax = axes.pop(0)
    for key in tasks:
      points = [(r["step"], r[key]) for r in evals if key in r]
      ax.plot(*zip(*points, strict=True), "o-", label=key)
    ax.set_xlabel("step")
    ax.set_ylabel("lm-eval tasks")
    ax.legend(fontsize="small")
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)
