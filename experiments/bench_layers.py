"""Compiled memory and step time of the engine's train step over a stack of
linear layers.

python -m experiments.bench_layers [--layers 8 --dim 4096 --rank 16]

The engine's own train step (`qlora_jax.engine.steps`: forward, backward,
AdamW on the trainable tree) over a stack of `layers` linear layers of dim
x dim (`qlora_jax.bench.layers`), for each training mode of
`qlora_jax.engine.recipes`: full fine-tune f32, LoRA over a frozen f32 base,
LoRA over a frozen bf16 base, QLoRA nf4 + double quant. Reports XLA's
compiled memory (arguments + temporaries + outputs - aliased), trainable
parameters and the median step time, at 1x128 and 4x512 tokens, and the
QLoRA ratios against the better LoRA baseline. Last line: JSON.
"""

import json

from absl import flags

from qlora_jax.bench import layers
from qlora_jax.engine import cli
from qlora_jax.engine.recipes import RECIPES as MODES

_LAYERS = flags.DEFINE_integer("layers", 8, "Layers in the stack.")
_DIM = flags.DEFINE_integer("dim", 4096, "Width of every layer.")
_RANK = flags.DEFINE_integer("rank", 16, "LoRA rank.")
_SCAN = flags.DEFINE_bool("scan", True, "nn.scan over the layers.")
_TOKENS = flags.DEFINE_list("tokens", ["1x128", "4x512"], "Batch shapes.")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed steps per variant.")


def main(argv):
  del argv
  results = []
  for shape in _TOKENS.value:
    batch, seq = (int(v) for v in shape.split("x"))
    for name in MODES:
      r = layers.run_variant(
        name,
        batch,
        seq,
        layers=_LAYERS.value,
        dim=_DIM.value,
        rank=_RANK.value,
        scan=_SCAN.value,
        repeats=_REPEATS.value,
      )
      results.append(r)
      print(
        f"{r['tokens']:>6} {name:<13} memory {r['memory_mib']:8.1f} MiB "
        f"(temp {r['temp_mib']:7.1f})  trainable {r['trainable']:>11,}  "
        f"step {r['step_s'] * 1e3:8.1f} ms",
        flush=True,
      )
  summary = {"scan": _SCAN.value, "layers": _LAYERS.value, "dim": _DIM.value}
  for shape in _TOKENS.value:
    by = {r["variant"]: r for r in results if r["tokens"] == shape}
    q = by["qlora_nf4_dq"]
    mem_base = min(by["lora_f32"]["memory_mib"], by["lora_bf16"]["memory_mib"])
    time_base = min(by["lora_f32"]["step_s"], by["lora_bf16"]["step_s"])
    mem_ratio = q["memory_mib"] / mem_base
    time_ratio = q["step_s"] / time_base
    print(
      f"{shape}: QLoRA memory {q['memory_mib']:.1f} MiB = {mem_ratio:.3f}x "
      f"the better LoRA ({mem_base:.1f} MiB; ideal {q['ideal_mib']:.1f} MiB), "
      f"step {time_ratio:.3f}x the faster LoRA"
    )
    key = shape.replace("x", "x")
    summary[f"qlora_memory_ratio_{key}"] = round(mem_ratio, 4)
    summary[f"qlora_time_ratio_{key}"] = round(time_ratio, 4)
    summary[f"qlora_ideal_mib_{key}"] = round(q["ideal_mib"], 1)
    for r in by.values():
      summary[f"{r['variant']}_{key}_mib"] = round(r["memory_mib"], 1)
      summary[f"{r['variant']}_{key}_ms"] = round(r["step_s"] * 1e3, 1)
  first = _TOKENS.value[0]
  summary["qlora_memory_ratio"] = summary[f"qlora_memory_ratio_{first}"]
  summary["qlora_time_ratio"] = summary[f"qlora_time_ratio_{first}"]
  print(json.dumps(summary))


if __name__ == "__main__":
  cli.run(main)
