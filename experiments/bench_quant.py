"""Times quantize and dequantize of a float32 weight, against bitsandbytes.

python -m experiments.bench_quant
.venv-peers/bin/python -m experiments.bench_quant   # with bitsandbytes

Median wall ms over --repeats rounds (jitted, warmed up) of this codebase's
`quantize` and `dequantize` of a --size x --size float32 weight: nf4 with and
without double quantization, every NF-k, int4 and fp4. When torch and
bitsandbytes import, bitsandbytes' CPU `quantize_4bit` / `dequantize_4bit`
(nf4, with and without compress_statistics) run on the same tensor in the
same rounds, and the speedups (theirs / ours) are printed. The last line is
JSON. Goal (issue 2): quantize at least 2x faster than bitsandbytes,
dequantize at least as fast.
"""

import json
import os

import jax
import numpy as np
from absl import flags

from qlora_jax import quant
from qlora_jax.bench import quant as bench
from qlora_jax.engine import cli

_SIZE = flags.DEFINE_integer("size", 4096, "Rows and columns of the weight.")
_BLOCK = flags.DEFINE_integer("block_size", 64, "Quantization block size.")
_REPEATS = flags.DEFINE_integer("repeats", 11, "Timed rounds (median).")
_BNB = flags.DEFINE_bool("bnb", True, "Time bitsandbytes when importable.")

# (data type, double quant): nf4 both ways, every NF-k, and two references.
_SPECS = (
  ("nf4", False),
  ("nf4", True),
  ("nf2", True),
  ("nf3", True),
  ("nf5", True),
  ("nf6", True),
  ("nf8", True),
  ("int4", True),
  ("fp4", True),
)


def _bitsandbytes(x: np.ndarray, block_size: int):
  """bitsandbytes' nf4 calls per double-quant setting, or None without it."""
  try:
    import bitsandbytes.functional as bnb_f
    import torch
  except ImportError:
    return None
  xt = torch.from_numpy(x)
  ours = {}

  def fns(data_type: str, double_quant: bool):
    if data_type != "nf4":
      return None
    kw = dict(blocksize=block_size, compress_statistics=double_quant)
    packed, state = bnb_f.quantize_4bit(xt, quant_type="nf4", **kw)
    mine = quant.quantize(x, "nf4", block_size, double_quant).codes
    ours[double_quant] = np.array_equal(mine, packed.numpy().reshape(-1))
    return {
      "bnb_quantize": lambda: bnb_f.quantize_4bit(xt, quant_type="nf4", **kw),
      "bnb_dequantize": lambda: bnb_f.dequantize_4bit(packed, state),
    }

  return fns, ours


def main(argv):
  del argv
  n = _SIZE.value
  x_np = np.random.default_rng(0).standard_normal((n, n), np.float32)
  x = jax.numpy.asarray(x_np)
  peer = _bitsandbytes(x_np, _BLOCK.value) if _BNB.value else None

  def baseline(data_type: str, double_quant: bool):
    # Timed in the same rounds as ours: bitsandbytes in the nf4 rows, and in
    # the first row the writing of a fresh output array (its page faults make
    # it a floor for any dequantize).
    fns = (peer[0](data_type, double_quant) if peer else None) or {}
    if (data_type, double_quant) == _SPECS[0]:
      fns = dict(fns, fresh_array=bench.fresh_array_fn(x))
    return fns

  rows = bench.time_specs(x, _SPECS, _BLOCK.value, _REPEATS.value, baseline)
  floor_ms = rows[0].pop("fresh_array_ms")

  load = os.getloadavg()[0]
  print(
    f"{n}x{n} float32, block {_BLOCK.value}: median ms of {_REPEATS.value} "
    f"rounds (load average {load:.2f})"
  )
  print(f"{'type':6s} {'dq':>3s} {'quantize':>9s} {'dequantize':>11s}")
  for r in rows:
    print(
      f"{r['data_type']:6s} {int(r['double_quant']):3d} "
      f"{r['quantize_ms']:9.1f} {r['dequantize_ms']:11.1f}"
    )
  print(f"writing a fresh {n}x{n} float32 array (a floor): {floor_ms:.1f}")
  result = dict(
    shape=[n, n],
    block_size=_BLOCK.value,
    repeats=_REPEATS.value,
    load_average=round(load, 2),
    fresh_array_ms=round(floor_ms, 2),
    rows=rows,
  )
  if peer is None:
    print("bitsandbytes: not importable (or --nobnb), no comparison")
  else:
    speedups = {}
    for r in (r for r in rows if "bnb_quantize_ms" in r):
      dq = r["double_quant"]
      speedups[f"nf4_dq{int(dq)}"] = s = dict(
        quantize=round(r["bnb_quantize_ms"] / r["quantize_ms"], 2),
        dequantize=round(r["bnb_dequantize_ms"] / r["dequantize_ms"], 2),
        identical_codes=bool(peer[1][dq]),
      )
      print(
        f"bitsandbytes nf4 dq={int(dq)}: quantize {r['bnb_quantize_ms']:.1f} "
        f"(ours {s['quantize']:.2f}x faster), dequantize "
        f"{r['bnb_dequantize_ms']:.1f} (ours {s['dequantize']:.2f}x faster), "
        f"identical packed codes: {s['identical_codes']}"
      )
    result["speedups_vs_bitsandbytes"] = speedups
    result["goals_met"] = dict(
      quantize_2x=all(s["quantize"] >= 2 for s in speedups.values()),
      dequantize_1x=all(s["dequantize"] >= 1 for s in speedups.values()),
    )
  print(json.dumps(result))


if __name__ == "__main__":
  cli.run(main)
