"""Training throughput and peak memory, side by side with PEFT + bitsandbytes.

python -m experiments.bench_train [--steps 10 --warmup 3]
python -m experiments.bench_train --shape smollm2 [--modes qlora_nf4_dq]

--shape small (the default): a Llama-shaped model (hidden 512, 4 layers,
8 heads, MLP 1408, vocab 32,000; random weights written once as a Hugging
Face folder), batch 4 x 128 tokens. --shape smollm2: the real
SmolLM2-135M-Instruct (its GGUF file converted to a float32 Hugging Face
folder with experiments.convert's code, so both sides load the same
weights), batch 8 x 256 tokens (packed rows: every position is a token).
Either way AdamW, LoRA r=16 on every linear layer: full fine-tune, LoRA
over an f32 and a bf16 base, and QLoRA NF4 + double quantization, each in
its own process. When torch, transformers, peft and bitsandbytes import
(the peers extra), the same modes run with PEFT + bitsandbytes in the same
invocation, alternating with ours. Prints tokens/s (median step after
warm-up) and peak RSS per run and the ratios; the last line is one JSON
object.
"""

import json
import os
import tempfile

from absl import flags

from qlora_jax import models
from qlora_jax.bench import train as bench_train
from qlora_jax.bench import workers
from qlora_jax.engine import cli
from qlora_jax.engine.recipes import RECIPES as MODES
from qlora_jax.interop import gguf_convert

_STEPS = flags.DEFINE_integer("steps", 10, "Timed steps per run.")
_WARMUP = flags.DEFINE_integer("warmup", 3, "Untimed steps first.")
_MODES = flags.DEFINE_list("modes", list(MODES), "Modes to run.")
_PEERS = flags.DEFINE_enum("peers", "auto", ["auto", "on", "off"], "PEFT.")
_REMAT = flags.DEFINE_bool(
  "remat",
  False,
  "Ours: recompute blocks in the backward pass (PEFT runs "
  "without gradient checkpointing).",
)
_SCAN = flags.DEFINE_bool("scan_layers", True, "Ours: nn.scan over blocks.")
_SHAPE = flags.DEFINE_enum(
  "shape", "small", ["small", "smollm2"], "The model and batch (see above)."
)
SHAPES = {"small": (4, 128), "smollm2": (8, 256)}  # (batch, tokens per row)
_WORKER = flags.DEFINE_string("worker", None, "Internal: IMPL:MODE:CKPT.")

GiB = 2**30


def _worker(spec: str) -> None:
  impl, mode, checkpoint = spec.split(":", 2)
  batch, seq = SHAPES[_SHAPE.value]
  kwargs = {"steps_timed": _STEPS.value, "warmup": _WARMUP.value}
  kwargs |= {"batch": batch, "seq": seq}
  if impl == "ours":
    result = bench_train.train_throughput(
      mode, checkpoint, remat=_REMAT.value, scan_layers=_SCAN.value, **kwargs
    )
  else:
    from experiments.peers import peft_train  # noqa: PLC0415

    result = peft_train.train_throughput(mode, checkpoint, **kwargs)
  print(json.dumps(result))


def _run(impl: str, mode: str, checkpoint: str) -> dict:
  return workers.run_worker(
    "experiments.bench_train",
    f"{impl}:{mode}:{checkpoint}",
    [
      f"--steps={_STEPS.value}",
      f"--warmup={_WARMUP.value}",
      f"--remat={_REMAT.value}",
      f"--scan_layers={_SCAN.value}",
      f"--shape={_SHAPE.value}",
    ],
  )


def main(argv):
  del argv
  if _WORKER.value:
    _worker(_WORKER.value)
    return
  peers = workers.peers_available(_PEERS.value)
  results: dict[str, dict] = {}
  with tempfile.TemporaryDirectory() as tmp:
    if _SHAPE.value == "smollm2":
      gguf_convert.convert(models.smollm2_path(), tmp)
    else:
      bench_train.write_random_llama(tmp, bench_train.llama_config())
    for mode in _MODES.value:
      impls = ["ours", "peft"] if peers else ["ours"]
      for impl in impls:
        r = _run(impl, mode, tmp)
        results[f"{impl}_{mode}"] = r
        print(
          f"{impl:<5} {mode:<13} {r['tokens_per_s']:8.0f} tokens/s  "
          f"step {r['step_s']:.3f} s  peak RSS {r['peak_rss_bytes'] / GiB:.2f} "
          f"GiB  trainable {r['trainable_params']:,}",
          flush=True,
        )
  summary: dict[str, float] = {}
  for key, r in results.items():
    summary[f"{key}_tokens_per_s"] = round(r["tokens_per_s"], 1)
    summary[f"{key}_peak_rss_gib"] = round(r["peak_rss_bytes"] / GiB, 3)
  q = results.get("ours_qlora_nf4_dq")
  loras = [results.get(f"ours_{m}") for m in ("lora_f32", "lora_bf16")]
  loras = [r for r in loras if r]
  if q and loras:
    ratio = q["step_s"] / min(r["step_s"] for r in loras)
    summary["qlora_step_time_ratio_vs_own_lora"] = round(ratio, 3)
    print(f"our QLoRA step time: {ratio:.2f}x our faster LoRA")
  pq = results.get("peft_qlora_nf4_dq")
  if q and pq:
    tok = q["tokens_per_s"] / pq["tokens_per_s"]
    rss = q["peak_rss_bytes"] / pq["peak_rss_bytes"]
    summary["qlora_tokens_per_s_ratio_vs_peft"] = round(tok, 3)
    summary["qlora_peak_rss_ratio_vs_peft"] = round(rss, 3)
    print(
      f"QLoRA vs PEFT + bitsandbytes: {tok:.2f}x tokens/s, {rss:.2f}x peak RSS"
    )
  summary["shape"] = _SHAPE.value
  summary["batch"], summary["tokens_per_row"] = SHAPES[_SHAPE.value]
  summary["peers"] = peers
  summary["cpu_count"] = os.cpu_count()
  print(json.dumps(summary))


if __name__ == "__main__":
  cli.run(main)
