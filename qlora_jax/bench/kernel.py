"""Timing the fused 4-bit matmul against bf16 and the XLA path
(experiments.bench_kernel): both matmuls of a quantized linear layer, the
forward `x @ W.T` and the input gradient `g @ W`, with achieved bandwidth
and FLOP/s against the device's peaks."""

import statistics

import jax
import jax.numpy as jnp

from qlora_jax import quant
from qlora_jax.engine.profiling import median_seconds
from qlora_jax.nn import matmul as qmatmul
from qlora_jax.nn import pallas_matmul

# (HBM bytes/s, dense bf16 FLOP/s) by a substring of `device_kind`, first
# match wins; vendors' data-sheet figures.
PEAKS = (
  ("H200", 4.8e12, 989e12),
  ("H100 PCIe", 2.0e12, 756e12),
  ("H100", 3.35e12, 989e12),
  ("A100-SXM4-80GB", 2.039e12, 312e12),
  ("A100", 1.555e12, 312e12),
  ("L4", 0.3e12, 121e12),
  ("TPU v6 lite", 1.64e12, 918e12),
  ("TPU v5 lite", 0.819e12, 197e12),
  ("TPU v5", 2.765e12, 459e12),
  ("TPU v4", 1.2e12, 275e12),
)


def device_peaks(kind: str):
  """(bytes/s, FLOP/s) of a device kind, or (None, None) if unknown."""
  for name, bandwidth, flops in PEAKS:
    if name in kind:
      return bandwidth, flops
  return None, None


def implementations(qt, w_bf16, use_pallas: bool):
  """name -> (forward(x), input_grad(g)) jitted callables."""
  bf = jnp.bfloat16
  impls = {
    "bf16": (
      jax.jit(lambda x: qmatmul._dot_last(x, w_bf16, 1)),
      jax.jit(lambda g: qmatmul._dot_last(g, w_bf16, 0)),
    ),
    "xla": (
      jax.jit(lambda x: qmatmul.quantized_matmul(x, qt, bf, "xla")),
      jax.jit(
        lambda g: jax.vjp(
          lambda x: qmatmul.quantized_matmul(x, qt, bf, "xla"),
          jnp.zeros((g.shape[0], qt.shape[1]), bf),
        )[1](g)[0]
      ),
    ),
  }
  if use_pallas:
    impls["pallas"] = (
      jax.jit(lambda x: pallas_matmul.matmul(x, qt, bf)),
      jax.jit(lambda g: pallas_matmul.input_grad(g, qt, bf)),
    )
  return impls


def measure(
  weights: list[str],
  decode_tokens: int,
  prefill_tokens: int,
  data_type: str,
  block_size: int,
  double_quant: bool,
  repeats: int,
  use_pallas: bool,
) -> list[dict]:
  """One row per weight, regime, op and implementation, with speedups."""
  peak_bw, peak_flops = device_peaks(jax.devices()[0].device_kind)
  rows = []
  key = jax.random.key(0)
  for spec in weights:
    n, k = (int(v) for v in spec.lower().split("x"))
    w = jax.random.normal(key, (n, k), jnp.float32) * 0.02
    qt = quant.quantize(w, data_type, block_size, double_quant)
    w_bf16 = w.astype(jnp.bfloat16)
    del w
    impls = implementations(qt, w_bf16, use_pallas)
    for regime, m in (("decode", decode_tokens), ("prefill", prefill_tokens)):
      x = jax.random.normal(key, (m, k), jnp.bfloat16)
      g = jax.random.normal(key, (m, n), jnp.bfloat16)
      act_bytes = 2 * (m * k + m * n)
      for name, (fwd, bwd) in impls.items():
        weight_bytes = 2 * n * k if name == "bf16" else qt.nbytes
        for op, fn, arg in (("forward", fwd, x), ("input_grad", bwd, g)):
          seconds = median_seconds(
            lambda fn=fn, arg=arg: fn(arg), warmup=2, repeats=repeats
          )
          moved = weight_bytes + act_bytes
          flop = pallas_matmul.flops(m, n, k)
          rows.append(
            {
              "weight": f"{n}x{k}",
              "regime": regime,
              "tokens": m,
              "op": op,
              "impl": name,
              "ms": seconds * 1e3,
              "gb_per_s": moved / seconds / 1e9,
              "tflop_per_s": flop / seconds / 1e12,
              "bandwidth_share": peak_bw and moved / seconds / peak_bw,
              "flops_share": peak_flops and flop / seconds / peak_flops,
            }
          )
  base = {
    (r["weight"], r["regime"], r["op"]): r["ms"]
    for r in rows
    if r["impl"] == "bf16"
  }
  for r in rows:
    r["speedup_vs_bf16"] = base[(r["weight"], r["regime"], r["op"])] / r["ms"]
  return rows


def summarize(rows: list[dict], use_pallas: bool) -> dict:
  """Min and median speedups over bf16 per implementation and regime."""
  device = jax.devices()[0]
  backend = jax.default_backend()
  summary = {"device": device.device_kind, "backend": backend}
  for impl in ("xla", "pallas"):
    for regime in ("decode", "prefill"):
      speedups = [
        r["speedup_vs_bf16"]
        for r in rows
        if r["impl"] == impl and r["regime"] == regime
      ]
      if speedups:
        key = f"{impl}_{regime}_speedup_vs_bf16"
        summary[f"{key}_min"] = min(speedups)
        summary[f"{key}_median"] = statistics.median(speedups)
  if use_pallas and backend == "gpu":
    summary["goal_decode_2_5x_met"] = (
      summary["pallas_decode_speedup_vs_bf16_min"] >= 2.5
    )
    summary["goal_prefill_0_9x_met"] = (
      summary["pallas_prefill_speedup_vs_bf16_min"] >= 0.9
    )
  summary["rows"] = rows
  return summary
