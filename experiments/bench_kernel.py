"""Times the fused 4-bit Pallas matmul against bf16 and the XLA path.

python -m experiments.bench_kernel                      # on a GPU or TPU
python -m experiments.bench_kernel --weights=256x512 --decode_tokens=4 \
  --prefill_tokens=64 --pallas                          # CPU smoke run

For each weight W [out, in] (default 4096x4096 and 14336x4096, nf4 + double
quant, block 64) and each token count (decode-like: 16; prefill-like: 4096),
the median time of three implementations of both matmuls of a quantized
linear layer, the forward `x @ W.T` and the input gradient `g @ W`:

  bf16   a plain bf16 dot with a bf16 copy of W (the speed to beat);
  xla    the XLA path: dequantize W (chunked, in the compute dtype), then dot;
  pallas the fused kernel (`qlora_jax.nn.pallas_matmul`): codes and scales
         are decoded in registers / VMEM, no dequantized W in device memory.

It prints achieved bandwidth (over the bytes each implementation must move
at least: bf16 W, or codes + scales, plus activations) and FLOP/s, each as a
share of the device's peak where the device is known, and the speedups over
bf16. Goals on a Hopper GPU: pallas >= 2.5x bf16 at decode shapes (the bytes
allow ~3.9x), >= 0.9x at prefill shapes. On the CPU the kernel only runs in
Pallas interpret mode, which says nothing about speed: --pallas is off there
unless asked for (small shapes). The last line is one JSON object.
"""

import json
import statistics

import jax
import jax.numpy as jnp
from absl import app, flags, logging

from qlora_jax import quant
from qlora_jax.nn import matmul as qmatmul
from qlora_jax.nn import pallas_matmul
from qlora_jax.profiling import median_seconds

_WEIGHTS = flags.DEFINE_list(
  "weights", ["4096x4096", "14336x4096"], "Weights as OUTxIN."
)
_DECODE = flags.DEFINE_integer("decode_tokens", 16, "Decode-like tokens.")
_PREFILL = flags.DEFINE_integer("prefill_tokens", 4096, "Prefill-like tokens.")
_DATA_TYPE = flags.DEFINE_string("data_type", "nf4", "A 4-bit data type.")
_BLOCK = flags.DEFINE_integer("block_size", 64, "Quantization block size.")
_DQ = flags.DEFINE_bool("double_quant", True, "Double-quantize the scales.")
_REPEATS = flags.DEFINE_integer("repeats", 20, "Timed calls (median).")
_PALLAS = flags.DEFINE_bool(
  "pallas", None, "Time the Pallas kernel (default: on a GPU or TPU only)."
)

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


def _implementations(qt, w_bf16, use_pallas: bool):
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


def main(argv):
  del argv
  device = jax.devices()[0]
  backend = jax.default_backend()
  use_pallas = _PALLAS.value
  if use_pallas is None:
    use_pallas = backend in ("gpu", "tpu")
  peak_bw, peak_flops = device_peaks(device.device_kind)
  logging.info("device %s (%s)", device.device_kind, backend)
  print(
    f"device: {device.device_kind} ({backend}), peaks: "
    f"{peak_bw and peak_bw / 1e12} TB/s, {peak_flops and peak_flops / 1e12}"
    " TFLOP/s bf16"
  )
  rows = []
  key = jax.random.key(0)
  for spec in _WEIGHTS.value:
    n, k = (int(v) for v in spec.lower().split("x"))
    w = jax.random.normal(key, (n, k), jnp.float32) * 0.02
    qt = quant.quantize(w, _DATA_TYPE.value, _BLOCK.value, _DQ.value)
    w_bf16 = w.astype(jnp.bfloat16)
    del w
    impls = _implementations(qt, w_bf16, use_pallas)
    for regime, m in (("decode", _DECODE.value), ("prefill", _PREFILL.value)):
      x = jax.random.normal(key, (m, k), jnp.bfloat16)
      g = jax.random.normal(key, (m, n), jnp.bfloat16)
      act_bytes = 2 * (m * k + m * n)
      for name, (fwd, bwd) in impls.items():
        weight_bytes = 2 * n * k if name == "bf16" else qt.nbytes
        for op, fn, arg in (("forward", fwd, x), ("input_grad", bwd, g)):
          seconds = median_seconds(
            lambda fn=fn, arg=arg: fn(arg), warmup=2, repeats=_REPEATS.value
          )
          moved = weight_bytes + act_bytes
          rows.append(
            {
              "weight": f"{n}x{k}",
              "regime": regime,
              "tokens": m,
              "op": op,
              "impl": name,
              "ms": seconds * 1e3,
              "gb_per_s": moved / seconds / 1e9,
              "tflop_per_s": pallas_matmul.flops(m, n, k) / seconds / 1e12,
              "bandwidth_share": peak_bw and moved / seconds / peak_bw,
              "flops_share": peak_flops
              and pallas_matmul.flops(m, n, k) / seconds / peak_flops,
            }
          )

  print(
    f"{'weight':>11} {'regime':>8} {'op':>10} {'impl':>6} {'ms':>9} "
    f"{'GB/s':>8} {'%peakBW':>8} {'TFLOP/s':>8} {'%peakF':>7} {'vs bf16':>8}"
  )
  base = {
    (r["weight"], r["regime"], r["op"]): r["ms"]
    for r in rows
    if r["impl"] == "bf16"
  }
  for r in rows:
    r["speedup_vs_bf16"] = base[(r["weight"], r["regime"], r["op"])] / r["ms"]
    pct = lambda v: "-" if v is None else f"{100 * v:.1f}"
    print(
      f"{r['weight']:>11} {r['regime']:>8} {r['op']:>10} {r['impl']:>6} "
      f"{r['ms']:9.3f} {r['gb_per_s']:8.1f} {pct(r['bandwidth_share']):>8} "
      f"{r['tflop_per_s']:8.2f} {pct(r['flops_share']):>7} "
      f"{r['speedup_vs_bf16']:7.2f}x"
    )

  summary = {"device": device.device_kind, "backend": backend}
  for impl in ("xla", "pallas"):
    for regime in ("decode", "prefill"):
      speedups = [
        r["speedup_vs_bf16"]
        for r in rows
        if r["impl"] == impl and r["regime"] == regime
      ]
      if speedups:
        key_ = f"{impl}_{regime}_speedup_vs_bf16_min"
        summary[key_] = min(speedups)
        summary[f"{impl}_{regime}_speedup_vs_bf16_median"] = statistics.median(
          speedups
        )
  if use_pallas and backend == "gpu":
    summary["goal_decode_2_5x_met"] = (
      summary["pallas_decode_speedup_vs_bf16_min"] >= 2.5
    )
    summary["goal_prefill_0_9x_met"] = (
      summary["pallas_prefill_speedup_vs_bf16_min"] >= 0.9
    )
  summary["rows"] = rows
  print(json.dumps(summary))


if __name__ == "__main__":
  app.run(main)
