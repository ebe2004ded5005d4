"""Wall-clock timing of quantize and dequantize (experiments.bench_quant)."""

import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from qlora_jax.quant import tensor


def time_interleaved(
  fns: Mapping[str, Callable[[], Any]], repeats: int = 11, warmup: int = 2
) -> dict[str, float]:
  """Median wall seconds of each zero-argument function.

  Every round calls each function once, in turn, so that a change in the
  machine's load during the run affects all of them alike. Each result is
  waited for (`jax.block_until_ready`; other values are returned finished).
  """
  for _ in range(warmup):
    for fn in fns.values():
      jax.block_until_ready(fn())
  times = {name: [] for name in fns}
  for _ in range(repeats):
    for name, fn in fns.items():
      start = time.perf_counter()
      jax.block_until_ready(fn())
      times[name].append(time.perf_counter() - start)
  return {name: statistics.median(t) for name, t in times.items()}


def quantizer_fns(
  x: jax.Array, data_type: str, block_size: int, double_quant: bool
) -> dict[str, Callable[[], Any]]:
  """Zero-argument `quantize` and `dequantize` calls for `time_interleaved`.

  The public functions, so quantize includes its host-side check that every
  value is finite.
  """
  spec = (data_type, block_size, double_quant)
  qt = tensor.quantize(x, *spec)
  return {
    "quantize": lambda: tensor.quantize(x, *spec),
    "dequantize": lambda: tensor.dequantize(qt),
  }


def time_specs(
  x: jax.Array,
  specs: Sequence[tuple[str, bool]],
  block_size: int,
  repeats: int,
  baseline: Callable[[str, bool], Mapping[str, Callable[[], Any]] | None]
  | None = None,
) -> list[dict[str, Any]]:
  """Median ms of quantize and dequantize of `x` for each (data type, double
  quant) spec; `baseline(data_type, double_quant)` may add functions (say,
  another library's) to time in the same rounds, reported as `NAME_ms`."""
  rows = []
  for data_type, double_quant in specs:
    fns = dict(quantizer_fns(x, data_type, block_size, double_quant))
    fns |= (baseline and baseline(data_type, double_quant)) or {}
    medians = time_interleaved(fns, repeats)
    row = dict(data_type=data_type, double_quant=double_quant)
    row |= {f"{k}_ms": round(1e3 * v, 2) for k, v in medians.items()}
    rows.append(row)
  return rows


def fresh_array_fn(x: jax.Array) -> Callable[[], Any]:
  """A zero-argument call that writes a fresh array shaped like `x`: a floor
  for any dequantize, which must touch every page of its output once."""
  fresh = jax.jit(lambda x: jnp.zeros_like(x) + x.reshape(-1)[0])
  return lambda: fresh(x)
