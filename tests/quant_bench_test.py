"""The timing helpers of experiments.bench_quant (behaviour, not speed),
timed on a fake clock that only the timed functions advance, by scripted
durations: every figure has an exact, hand-computed value."""

import jax
import numpy as np

from qlora_jax import quant
from qlora_jax.bench import quant as bench


def _fake_clock(monkeypatch) -> list[float]:
  """`time.perf_counter` as seen by the bench: reads clock[0]."""
  clock = [0.0]
  monkeypatch.setattr(bench.time, "perf_counter", lambda: clock[0])
  return clock


def _advances(clock, durations, calls=None, name=None):
  """A zero-argument function that advances `clock` by the next of
  `durations` (and appends `name` to `calls`)."""
  left = iter(durations)

  def fn():
    clock[0] += next(left)
    if calls is not None:
      calls.append(name)

  return fn


def test_time_interleaved_reports_each_functions_median(monkeypatch):
  """Warmup rounds untimed, one call of each function per round in turn,
  and each figure the median of its own timed calls: exact (the durations
  are binary fractions, so the clock's differences are too)."""
  clock, calls = _fake_clock(monkeypatch), []
  durations = {
    "a": [9.0, 1.0, 3.0, 2.0],  # median of the timed calls: 2
    "b": [9.0, 0.5, 0.25, 4.0],  # 0.5
    "c": [9.0, 8.0, 8.0, 0.125],  # 8
  }
  fns = {k: _advances(clock, d, calls, k) for k, d in durations.items()}
  times = bench.time_interleaved(fns, repeats=3, warmup=1)
  assert calls == list("abc") * 4
  assert times == {"a": 2.0, "b": 0.5, "c": 8.0}


def test_quantizer_fns_run_the_public_functions():
  """Both functions return what `quant.quantize` and `quant.dequantize`
  return for the same spec: exact."""
  x = np.linspace(-1, 1, 256, dtype=np.float32).reshape(4, 64)
  fns = bench.quantizer_fns(x, "nf3", 64, True)
  qt = fns["quantize"]()
  want = quant.quantize(x, "nf3", 64, True)
  assert isinstance(qt, quant.QuantizedTensor) and qt.spec == want.spec
  assert want.spec == quant.QuantSpec("nf3", 64, True)
  assert jax.tree.structure(qt) == jax.tree.structure(want)
  for got, ref in zip(jax.tree.leaves(qt), jax.tree.leaves(want), strict=True):
    np.testing.assert_array_equal(np.asarray(got), np.asarray(ref))
  np.testing.assert_array_equal(
    np.asarray(fns["dequantize"]()), np.asarray(quant.dequantize(want))
  )


def test_time_specs_rows_and_baseline(monkeypatch):
  """One row per spec, in order, each figure 1000 x the median of its
  function's timed calls rounded to 0.01 ms (hand-computed below; two
  warmup calls of 1 s each are not counted), and the baseline's functions
  timed in the same rounds, for the specs it returns them for."""
  clock, asked = _fake_clock(monkeypatch), []
  x = np.zeros((4, 64), np.float32)
  # Seconds of each function's 3 timed calls (after 2 warmup calls of
  # 1 s): medians 4, 1.5, 6.25, 12.5 and 0.5 ms.
  timed = {
    ("nf4", False, "quantize"): [0.004, 0.002, 0.008],
    ("nf4", False, "dequantize"): [0.0015, 0.0015, 0.0015],
    ("nf4", False, "peer_quantize"): [0.00625, 0.1, 0.0],
    ("int3", True, "quantize"): [0.0125, 0.0125, 0.0125],
    ("int3", True, "dequantize"): [0.0005, 0.0004, 0.0006],
  }

  def fns_of(names, data_type, double_quant):
    return {
      n: _advances(clock, [1.0, 1.0, *timed[data_type, double_quant, n]])
      for n in names
    }

  def quantizer_fns(x_arg, data_type, block_size, double_quant):
    assert x_arg is x and block_size == 64
    return fns_of(("quantize", "dequantize"), data_type, double_quant)

  def baseline(data_type, double_quant):
    asked.append((data_type, double_quant))
    if data_type != "nf4":
      return None
    return fns_of(("peer_quantize",), data_type, double_quant)

  monkeypatch.setattr(bench, "quantizer_fns", quantizer_fns)
  specs = [("nf4", False), ("int3", True)]
  rows = bench.time_specs(x, specs, 64, repeats=3, baseline=baseline)
  assert asked == specs
  assert rows == [
    {
      "data_type": "nf4",
      "double_quant": False,
      "quantize_ms": 4.0,
      "dequantize_ms": 1.5,
      "peer_quantize_ms": 6.25,
    },
    {
      "data_type": "int3",
      "double_quant": True,
      "quantize_ms": 12.5,
      "dequantize_ms": 0.5,
    },
  ]


def test_fresh_array_fn_writes_the_first_value_everywhere():
  """The floor's output: x's shape, every element x's first (exact)."""
  x = np.linspace(-1, 1, 256, dtype=np.float32).reshape(4, 64)
  fresh = np.asarray(bench.fresh_array_fn(x)())
  np.testing.assert_array_equal(fresh, np.full(x.shape, x[0, 0]))
