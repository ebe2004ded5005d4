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

import jax
from absl import flags

from qlora_jax.bench import kernel
from qlora_jax.engine import cli

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


def main(argv):
  del argv
  device = jax.devices()[0]
  backend = jax.default_backend()
  use_pallas = _PALLAS.value
  if use_pallas is None:
    use_pallas = backend in ("gpu", "tpu")
  peak_bw, peak_flops = kernel.device_peaks(device.device_kind)
  print(
    f"device: {device.device_kind} ({backend}), peaks: "
    f"{peak_bw and peak_bw / 1e12} TB/s, {peak_flops and peak_flops / 1e12}"
    " TFLOP/s bf16"
  )
  rows = kernel.measure(
    _WEIGHTS.value,
    _DECODE.value,
    _PREFILL.value,
    _DATA_TYPE.value,
    _BLOCK.value,
    _DQ.value,
    _REPEATS.value,
    use_pallas,
  )
  print(
    f"{'weight':>11} {'regime':>8} {'op':>10} {'impl':>6} {'ms':>9} "
    f"{'GB/s':>8} {'%peakBW':>8} {'TFLOP/s':>8} {'%peakF':>7} {'vs bf16':>8}"
  )
  for r in rows:
    pct = lambda v: "-" if v is None else f"{100 * v:.1f}"
    print(
      f"{r['weight']:>11} {r['regime']:>8} {r['op']:>10} {r['impl']:>6} "
      f"{r['ms']:9.3f} {r['gb_per_s']:8.1f} {pct(r['bandwidth_share']):>8} "
      f"{r['tflop_per_s']:8.2f} {pct(r['flops_share']):>7} "
      f"{r['speedup_vs_bf16']:7.2f}x"
    )
  print(json.dumps(kernel.summarize(rows, use_pallas)))


if __name__ == "__main__":
  cli.run(main)
