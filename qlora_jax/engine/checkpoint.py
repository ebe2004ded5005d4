"""Orbax checkpoints of a run: trainable state and everything to resume.

A checkpoint holds the train state (trainable tree, optimizer state, step,
RNG) and a JSON part (data-iterator position, label map, the config, and
which base checkpoint and quantization the run was made from). The frozen
base is never saved: it is rebuilt from the base checkpoint.
"""

import pathlib
from typing import Any

import jax
import orbax.checkpoint as ocp
from absl import logging


class CheckpointWriteError(RuntimeError):
  """A checkpoint that could not be written; the run stops."""


class Checkpoints:
  """The CheckpointManager of a workdir (`<workdir>/checkpoints`)."""

  def __init__(self, workdir: str | pathlib.Path, keep: int):
    if keep < 1:
      raise ValueError(
        f"train.keep_checkpoints must be >= 1 (the newest is always kept), "
        f"got {keep}"
      )
    self.directory = pathlib.Path(workdir).absolute() / "checkpoints"
    options = ocp.CheckpointManagerOptions(
      max_to_keep=keep,
      create=True,
      # A step's folder is made in the saving thread: a folder that cannot
      # be made raises there, instead of leaving orbax's writer threads
      # waiting (300 s each) for a folder that never comes.
      async_options=ocp.AsyncOptions(create_directories_asynchronously=False),
    )
    self._manager = ocp.CheckpointManager(
      self.directory,
      options=options,
      item_names=("state", "meta"),
    )

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def save(self, step: int, state: Any, meta: dict) -> None:
    """Saves and waits: a kill after this returns loses nothing saved.

    Raises:
      CheckpointWriteError: the write failed (a folder not writable, a
        full disk); the manager is shut down first, so that no background
        thread of orbax keeps the process alive.
    """
    try:
      self._manager.save(
        step,
        args=ocp.args.Composite(
          state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)
        ),
        force=True,
      )
      self._manager.wait_until_finished()
    except BaseException as e:
      self._shut_down()
      if not isinstance(e, Exception):  # Ctrl-C: stop as asked
        raise
      first = (str(e).strip().splitlines() or [""])[0][:300]
      raise CheckpointWriteError(
        f"checkpoint {step} could not be written to {self.directory} "
        f"({type(e).__name__}: {first}); make the folder writable or free "
        "space, then run again: the run resumes from the last checkpoint"
      ) from e
    logging.debug("saved checkpoint %d to %s", step, self.directory)

  def _shut_down(self) -> None:
    """Closes the manager after a failed save. Its first close raises the
    save's error again (once per thread) before closing anything, so a
    second one closes it; their errors are only logged."""
    for _ in range(2):
      try:
        self._manager.close()
        return
      except Exception as e:  # noqa: BLE001 - the save's error is the one
        logging.debug("closing %s after a failed save: %s", self.directory, e)

  def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict]:
    """(state, meta) of checkpoint `step`, with `abstract_state`'s shardings."""
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, abstract_state)
    out = self._manager.restore(
      step,
      args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()
      ),
    )
    logging.debug("restored checkpoint %d from %s", step, self.directory)
    return out["state"], out["meta"]

  def set_aside(self, step: int) -> pathlib.Path:
    """Moves checkpoint `step` (one that fails to read) out of the way, to
    `<workdir>/damaged_checkpoints/<step>`, so the run can save that step
    again; returns where it went."""
    target = self.directory.parent / "damaged_checkpoints" / str(step)
    target.parent.mkdir(parents=True, exist_ok=True)
    n = 1
    while target.exists():
      target = target.with_name(f"{step}.{n}")
      n += 1
    (self.directory / str(step)).rename(target)
    self._manager.reload()
    return target

  def read(self, step: int) -> tuple[Any, dict]:
    """(state as saved, as nested dicts of host arrays, meta): for tools."""
    out = self._manager.restore(
      step,
      args=ocp.args.Composite(
        state=ocp.args.StandardRestore(), meta=ocp.args.JsonRestore()
      ),
    )
    return out["state"], out["meta"]

  def close(self) -> None:
    self._manager.close()
