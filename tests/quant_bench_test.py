"""The timing helpers of experiments.bench_quant (behaviour, not speed)."""

import numpy as np

from qlora_jax import quant
from qlora_jax.bench import quant as bench


def test_time_interleaved_calls_each_function_in_turn():
  calls = []
  fns = {name: (lambda name=name: calls.append(name)) for name in "abc"}
  times = bench.time_interleaved(fns, repeats=3, warmup=1)
  assert calls == list("abc") * 4
  assert set(times) == set("abc") and all(t >= 0 for t in times.values())


def test_quantizer_fns_run_the_public_functions():
  x = np.linspace(-1, 1, 256, dtype=np.float32).reshape(4, 64)
  fns = bench.quantizer_fns(x, "nf3", 64, True)
  qt = fns["quantize"]()
  assert isinstance(qt, quant.QuantizedTensor) and qt.spec == quant.QuantSpec(
    "nf3", 64, True
  )
  np.testing.assert_array_equal(
    np.asarray(fns["dequantize"]()), np.asarray(quant.dequantize(qt))
  )


def test_time_specs_rows_and_baseline():
  x = np.linspace(-1, 1, 256, dtype=np.float32).reshape(4, 64)
  asked = []

  def baseline(data_type, double_quant):
    asked.append((data_type, double_quant))
    return {"peer_quantize": lambda: None} if data_type == "nf4" else None

  specs = [("nf4", False), ("int3", True)]
  rows = bench.time_specs(x, specs, 64, repeats=1, baseline=baseline)
  assert asked == specs
  assert [(r["data_type"], r["double_quant"]) for r in rows] == specs
  assert set(rows[0]) == {
    "data_type",
    "double_quant",
    "quantize_ms",
    "dequantize_ms",
    "peer_quantize_ms",
  }
  assert "peer_quantize_ms" not in rows[1]
  fresh = bench.fresh_array_fn(x)()
  assert fresh.shape == x.shape and np.all(np.asarray(fresh) == x[0, 0])
