"""Deterministic shuffling, and batch iterators whose position can be saved.

The order of epoch e is `epoch_permutation(n, seed, e)`: a pure function of
(seed, epoch), computed with a fixed integer hash (SplitMix64), so it does not
depend on NumPy's random streams nor on how many batches were drawn before.

Batches are global; process p of P gets rows [p*B/P, (p+1)*B/P) of each
global batch of B rows, so the P local batches concatenated in process order
are the one-process batch.
"""

from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np

_MASK64 = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15
_STATE_KEYS = (
  "seed",
  "epoch",
  "step_in_epoch",
  "num_examples",
  "batch_size",
  "shuffle",
  "drop_remainder",
)


def epoch_permutation(num_examples: int, seed: int, epoch: int) -> np.ndarray:
  """A permutation of range(num_examples) that depends only on its args."""
  seed, epoch = int(seed), int(epoch)
  if epoch < 0:
    raise ValueError(f"epoch must be >= 0, got {epoch}")
  base = _mix_int(_mix_int(seed & _MASK64) ^ epoch)
  counters = np.arange(1, num_examples + 1, dtype=np.uint64)
  keys = _mix(np.uint64(base) + counters * np.uint64(_GOLDEN))
  return np.argsort(keys, kind="stable")


class BatchIterator:
  """Endless global batches over epochs; yields this process's rows.

  Each epoch visits every example once (the last partial batch is dropped
  with `drop_remainder`, else yielded short). `state()` is a small JSON-able
  dict; `restore(state)` (or `state=` here) continues exactly where it was,
  on any number of processes.
  """

  def __init__(
    self,
    arrays: Mapping[str, np.ndarray],
    batch_size: int,
    seed: int = 0,
    shuffle: bool = True,
    drop_remainder: bool = True,
    process_index: int = 0,
    process_count: int = 1,
    state: Mapping[str, Any] | None = None,
  ):
    self.num_examples = _check_arrays(arrays)
    _check_processes(batch_size, process_index, process_count)
    if not _is_int(seed):
      raise ValueError(f"seed must be an integer, got {seed!r}")
    self.arrays = dict(arrays)
    self.batch_size = int(batch_size)
    self.seed = int(seed)
    self.shuffle = shuffle
    self.drop_remainder = drop_remainder
    self.process_index = process_index
    self.process_count = process_count
    if drop_remainder:
      self.steps_per_epoch = self.num_examples // batch_size
      if self.steps_per_epoch == 0:
        raise ValueError(
          f"batch_size {batch_size} is larger than the dataset "
          f"({self.num_examples} examples) and drop_remainder is set"
        )
    else:
      self.steps_per_epoch = -(-self.num_examples // batch_size)
      remainder = self.num_examples % batch_size
      if remainder % process_count:
        raise ValueError(
          f"the last batch has {remainder} rows, which {process_count} "
          "processes cannot share evenly; set drop_remainder or use "
          "EvalIterator"
        )
    self.epoch = 0
    self.step_in_epoch = 0
    self._order: tuple[int, np.ndarray] | None = None  # (epoch, permutation)
    if state is not None:
      self.restore(state)

  def __iter__(self) -> "BatchIterator":
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    start = self.step_in_epoch * self.batch_size
    rows = self._epoch_order()[start : start + self.batch_size]
    share = len(rows) // self.process_count
    local = rows[self.process_index * share : (self.process_index + 1) * share]
    self.step_in_epoch += 1
    if self.step_in_epoch == self.steps_per_epoch:
      self.epoch += 1
      self.step_in_epoch = 0
    return {name: value[local] for name, value in self.arrays.items()}

  def state(self) -> dict[str, Any]:
    """The position (next batch) and what it depends on, JSON-serialisable."""
    return {
      "seed": self.seed,
      "epoch": self.epoch,
      "step_in_epoch": self.step_in_epoch,
      "num_examples": self.num_examples,
      "batch_size": self.batch_size,
      "shuffle": self.shuffle,
      "drop_remainder": self.drop_remainder,
    }

  def restore(self, state: Mapping[str, Any]) -> None:
    """Continues from `state()`; the data and settings must be the same."""
    missing = [k for k in _STATE_KEYS if k not in state]
    if missing:
      raise ValueError(f"iterator state lacks {missing}")
    mine = self.state()
    for key in (
      "seed",
      "num_examples",
      "batch_size",
      "shuffle",
      "drop_remainder",
    ):
      if state[key] != mine[key]:
        raise ValueError(
          f"iterator state has {key}={state[key]!r} but this iterator has "
          f"{key}={mine[key]!r}"
        )
    epoch, step = state["epoch"], state["step_in_epoch"]
    if not (_is_int(epoch) and epoch >= 0):
      raise ValueError(f"iterator state has epoch={epoch!r}")
    if not (_is_int(step) and 0 <= step < self.steps_per_epoch):
      raise ValueError(
        f"iterator state has step_in_epoch={step!r}, not in "
        f"[0, {self.steps_per_epoch})"
      )
    self.epoch = int(epoch)
    self.step_in_epoch = int(step)

  def _epoch_order(self) -> np.ndarray:
    if self._order is None or self._order[0] != self.epoch:
      if self.shuffle:
        order = epoch_permutation(self.num_examples, self.seed, self.epoch)
      else:
        order = np.arange(self.num_examples)
      self._order = (self.epoch, order)
    return self._order[1]


class EvalIterator:
  """Every example once, in order; the last batch is padded to full size.

  Each batch has the arrays' fields plus `weights` [local batch] float32:
  1 for real rows, 0 for padding rows (copies of row 0, so the model sees
  valid inputs). Weighting per-row metrics by `weights` makes them exact.
  """

  def __init__(
    self,
    arrays: Mapping[str, np.ndarray],
    batch_size: int,
    process_index: int = 0,
    process_count: int = 1,
  ):
    self.num_examples = _check_arrays(arrays)
    _check_processes(batch_size, process_index, process_count)
    if "weights" in arrays:
      raise ValueError('arrays must not have a field named "weights"')
    self.arrays = dict(arrays)
    self.batch_size = int(batch_size)
    self.process_index = process_index
    self.process_count = process_count

  def __len__(self) -> int:
    return -(-self.num_examples // self.batch_size)

  def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
    share = self.batch_size // self.process_count
    for step in range(len(self)):
      rows = np.arange(step * self.batch_size, (step + 1) * self.batch_size)
      rows = rows[self.process_index * share : (self.process_index + 1) * share]
      valid = rows < self.num_examples
      rows = np.where(valid, rows, 0)
      batch = {name: value[rows] for name, value in self.arrays.items()}
      batch["weights"] = valid.astype(np.float32)
      yield batch


def _check_arrays(arrays: Mapping[str, np.ndarray]) -> int:
  """The common number of rows of the arrays."""
  if not arrays:
    raise ValueError("no arrays to iterate over")
  sizes = {}
  for name, value in arrays.items():
    if not isinstance(value, np.ndarray) or value.ndim == 0:
      raise ValueError(f'array "{name}" must be a numpy array with a row axis')
    sizes[name] = value.shape[0]
  if len(set(sizes.values())) != 1:
    raise ValueError(f"arrays have different numbers of rows: {sizes}")
  num_examples = next(iter(sizes.values()))
  if num_examples == 0:
    raise ValueError("the arrays have no rows")
  return num_examples


def _check_processes(
  batch_size: int, process_index: int, process_count: int
) -> None:
  if not _is_int(batch_size):
    raise ValueError(f"batch_size must be an integer, got {batch_size!r}")
  if batch_size < 1 or process_count < 1:
    raise ValueError(
      f"batch_size ({batch_size}) and process_count ({process_count}) must "
      "be positive"
    )
  if not 0 <= process_index < process_count:
    raise ValueError(
      f"process_index {process_index} is not in [0, {process_count})"
    )
  if batch_size % process_count:
    raise ValueError(
      f"global batch_size {batch_size} is not divisible by process_count "
      f"{process_count}"
    )


def _is_int(value: Any) -> bool:
  return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _mix_int(x: int) -> int:
  """SplitMix64's finalizer on a Python int (64-bit wrap-around)."""
  x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
  x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
  return x ^ (x >> 31)


def _mix(x: np.ndarray) -> np.ndarray:
  """SplitMix64's finalizer on uint64 arrays (multiplication wraps)."""
  x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
  x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
  return x ^ (x >> np.uint64(31))
