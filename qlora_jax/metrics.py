"""Metrics of a run: JSONL, TensorBoard event files, a progress line."""

import json
import math
import pathlib
import sys
import time
from typing import Any

import jax
from absl import logging


class MetricsWriter:
  """Appends one JSON object per record to `metrics.jsonl` and writes the
  scalars to TensorBoard (tensorboardX) in the same workdir. Only process 0
  writes."""

  def __init__(self, workdir: str | pathlib.Path):
    self.path = pathlib.Path(workdir) / "metrics.jsonl"
    self._active = jax.process_index() == 0
    self._tb = None
    if self._active:
      from tensorboardX import SummaryWriter  # noqa: PLC0415

      self._tb = SummaryWriter(str(pathlib.Path(workdir) / "tensorboard"))

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


def _plain(v: Any) -> Any:
  if hasattr(v, "item"):
    v = v.item()
  if isinstance(v, float) and not math.isfinite(v):
    return str(v)
  return v


def read_metrics(path: str | pathlib.Path) -> list[dict]:
  """Records of a metrics.jsonl; a step logged twice (a resumed run redoes
  the steps after its last checkpoint) keeps its last record."""
  latest: dict[tuple[str, int], dict] = {}
  for line in pathlib.Path(path).read_text().splitlines():
    if line.strip():
      r = json.loads(line)
      latest[(r["kind"], r["step"])] = r
  return sorted(latest.values(), key=lambda r: (r["step"], r["kind"]))


class Progress:
  """A one-line progress bar with loss, tokens/s and ETA on stderr."""

  def __init__(self, total_steps: int, start_step: int = 0):
    self.total = total_steps
    self.start = start_step
    self.t0 = time.perf_counter()
    self.tty = sys.stderr.isatty()

  def update(self, step: int, loss: float, tokens_per_s: float) -> None:
    if jax.process_index() != 0:
      return
    done = step - self.start
    elapsed = time.perf_counter() - self.t0
    eta = elapsed / max(done, 1) * (self.total - step)
    frac = step / max(self.total, 1)
    bar = "#" * int(20 * frac)
    line = (
      f"[{bar:<20}] step {step}/{self.total} loss {loss:.4f} "
      f"{tokens_per_s:,.0f} tok/s eta {eta:,.0f}s"
    )
    if self.tty:
      sys.stderr.write("\r" + line)
      sys.stderr.flush()
    else:
      logging.info(line)

  def close(self) -> None:
    if self.tty and jax.process_index() == 0:
      sys.stderr.write("\n")
