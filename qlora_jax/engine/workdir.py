"""A run directory that protects itself: its config, a lock, atomic writes.

The workdir records the settings that made it (`config.json`). A later run
in the same workdir must have the same settings, except for how it is
launched and how much it prints (`IGNORED_FIELDS`) and for how long and
how often (`SAFE_FIELDS`), which a run may change when asked to
(`allow_safe_changes`); anything else is refused with the list of
differing fields, before anything is written. A lock file held for
the run's life keeps a second run out; the lock of a process that no
longer exists is taken over. Files are written whole or not at all.
"""

import contextlib
import json
import os
import pathlib
import socket
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
from absl import logging

from qlora_jax.engine.settings import Settings, recorded

CONFIG = "config.json"
LOCK = "run.lock"
# How a run is launched and how much it prints: never compared.
IGNORED_FIELDS = (
  "train.keep_checkpoints",
  "train.log_every",
  "train.show_predictions",
  "train.memory_check",
  "model.matmul_kernel",
  "mesh.data",
  "mesh.fsdp",
  "distributed.enabled",
  "distributed.coordinator_address",
  "distributed.num_processes",
  "distributed.process_id",
  "distributed.cpu_collectives",
)
# How long a run trains and how often it evaluates and saves: allowed to
# change when asked (`allow_safe_changes`). The learning-rate schedule
# depends on the total steps: more steps continue with a new schedule.
SAFE_FIELDS = (
  "train.steps",
  "train.epochs",
  "train.eval_every",
  "train.checkpoint_every",
)


class WorkdirError(RuntimeError):
  """The workdir belongs to another run or another config."""


@contextlib.contextmanager
def naming(path: pathlib.Path, *undo: pathlib.Path):
  """An OSError raised inside without a path (a write to a full disk) is
  raised again naming `path`; the files `undo` are removed first."""
  try:
    yield
  except OSError as e:
    for leftover in undo:
      leftover.unlink(missing_ok=True)
    if e.filename is not None or e.errno is None:
      raise
    raise OSError(e.errno, e.strerror, str(path)) from e


def write_atomic(path: pathlib.Path, text: str) -> None:
  """Writes `text` to a temporary file beside `path`, then renames it."""
  path = pathlib.Path(path)
  tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
  with naming(path, tmp), tmp.open("w") as f:
    f.write(text)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)


def _flat(tree: Mapping[str, Any], prefix: str = "") -> Iterator:
  for key, value in tree.items():
    name = f"{prefix}{key}"
    if isinstance(value, Mapping) and name.count(".") == 0:
      yield from _flat(value, name + ".")
    else:
      yield name, value


def config_differences(old: Mapping, new: Mapping) -> dict[str, tuple]:
  """{field: (old value, new value)} of every field that differs."""
  a, b = dict(_flat(old)), dict(_flat(new))
  missing = object()
  return {
    k: (a.get(k, missing), b.get(k, missing))
    for k in sorted(set(a) | set(b))
    if a.get(k, missing) != b.get(k, missing)
  }


def check_config(
  workdir: pathlib.Path, settings: Mapping, allow_safe_changes: bool
) -> None:
  """Refuses a workdir whose recorded config differs from `settings`.

  Raises:
    WorkdirError: naming every differing field, before anything is written.
  """
  path = workdir / CONFIG
  if not path.is_file():
    return
  try:
    old = recorded(json.loads(path.read_text()))
  except json.JSONDecodeError as e:
    raise WorkdirError(f"{path}: not readable JSON ({e})") from e
  diff = {
    k: v
    for k, v in config_differences(old, settings).items()
    if k not in IGNORED_FIELDS
  }
  unsafe = {k: v for k, v in diff.items() if k not in SAFE_FIELDS}
  if not diff or (allow_safe_changes and not unsafe):
    return
  shown = "\n  ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in diff.items())
  if unsafe:
    hint = "use a new --workdir, or the recorded config"
  else:
    hint = "pass --allow_safe_changes to continue with them"
  raise WorkdirError(
    f"{workdir} holds a run made by another config; differing fields:\n"
    f"  {shown}\n{hint} (safe to change: {', '.join(SAFE_FIELDS)})"
  )


def _alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  return True


class Lock:
  """`workdir/run.lock` (pid and host) for the life of a run."""

  def __init__(self, workdir: pathlib.Path):
    self.path = pathlib.Path(workdir) / LOCK
    self.held = False

  def acquire(self) -> None:
    me = {"pid": os.getpid(), "host": socket.gethostname()}
    for _ in range(2):
      try:
        fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
      except FileExistsError:
        self._take_over_if_stale()
        continue
      with naming(self.path, self.path), os.fdopen(fd, "w") as f:
        json.dump(me, f)
      self.held = True
      return
    raise WorkdirError(f"{self.path}: could not take the lock")

  def _take_over_if_stale(self) -> None:
    try:
      owner = json.loads(self.path.read_text())
      pid, host = int(owner["pid"]), owner["host"]
    except (OSError, ValueError, KeyError, TypeError):
      owner, pid, host = None, None, None
    if owner is not None and host == socket.gethostname() and _alive(pid):
      raise WorkdirError(
        f"{self.path.parent} is in use by process {pid} on {host} (lock "
        f"{self.path}); wait for it, or use another --workdir"
      )
    if owner is not None and host != socket.gethostname():
      raise WorkdirError(
        f"{self.path.parent} is locked by process {pid} on host {host}; "
        f"remove {self.path} if that run is gone"
      )
    logging.warning(
      "%s: taking over the lock of a process that is gone", self.path
    )
    self.path.unlink(missing_ok=True)

  def release(self) -> None:
    if self.held:
      self.path.unlink(missing_ok=True)
      self.held = False

  def __enter__(self):
    self.acquire()
    return self

  def __exit__(self, *exc):
    self.release()


# What a run writes beside its config: each file whole or not at all.


def base_record(s: Settings) -> dict:
  """What the frozen base of a run is made of (saved with checkpoints)."""
  return {
    "checkpoint": s.model.checkpoint or "random init",
    "quant": s.quant.data_type,
    "block_size": s.quant.block_size,
    "double_quant": s.quant.double_quant,
  }


def write_plan(path: pathlib.Path, lines: list[str]) -> None:
  """The per-layer plan (`qlora_jax.nn.plan_lines`) as text, also logged
  at `-v 1`."""
  for line in lines:
    logging.debug("%s", line)
  write_atomic(path, "\n".join(lines) + "\n")


def write_answers(path: pathlib.Path, prompts, said: list[str]) -> None:
  """predictions.jsonl of a run that answers by generation."""
  records = [
    {"prompt": text, "answer": answer, "generated": got}
    for text, answer, got in zip(
      prompts.texts, prompts.answers, said, strict=True
    )
  ]
  write_atomic(path, "".join(_jsonl(r, False) for r in records))


def write_predictions(path: pathlib.Path, run_data, predictions) -> None:
  """predictions.jsonl of a classifier: text, label, predicted, probability."""
  names = run_data.label_map.names if run_data.label_map else None
  labels = np.asarray(run_data.eval["labels"])
  lines = []
  for i, (pred, prob) in enumerate(
    zip(predictions["predicted"], predictions["probability"], strict=True)
  ):
    record = {
      "text": run_data.eval_texts[i],
      "label": names[int(labels[i])] if names else int(labels[i]),
      "predicted": names[int(pred)] if names else int(pred),
      "probability": float(prob),
    }
    lines.append(_jsonl(record, True))
  write_atomic(path, "".join(lines))


def _jsonl(record: dict, ascii_only: bool) -> str:
  return json.dumps(record, ensure_ascii=ascii_only) + "\n"
