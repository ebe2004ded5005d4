"""The largest Llama that trains here, against the memory model and PEFT.

python -m experiments.bench_scale [--shapes 1b,3b,7b,13b]
  [--modes qlora_nf4_dq,lora_bf16,lora_f32,full] [--peers auto|on|off]
  [--out results/bench_scale] [--remove_checkpoints] [--redo] [--cold]
  [--generate 33b]

For each Llama shape (`bench.families.FAMILY`): a Hugging Face folder with
random bfloat16 weights as ~2 GB safetensors shards, written tensor by
tensor once into the cache (`--remove_checkpoints` deletes each after its
runs). For each mode, in its own process: load from disk (quantize-on-
load), 3 training steps of batch 1 x 256 tokens, LoRA r=16 on all linear
layers, remat and scanned layers, float32 compute (2.3x faster than
bfloat16 for XLA:CPU's dots here; LoRA over a bfloat16 base computes in
bfloat16, so that no float32 copy of the base exists); load time, peak RSS
of loading and of training, step time, tokens/s, finite loss. With the
peers extra, PEFT + bitsandbytes does the same. A run the memory model
predicts will not fit this machine is reported as "does not fit:
predicted N GiB" instead of being run into the OOM killer. Each finished
run is appended to OUT/runs.jsonl, and a re-run skips what is there
(failed runs are tried again, skips decided again; `--redo` measures the
named runs again, the new line superseding the old; `--cold` empties the
page cache before each run, so that both libraries read from disk; a
shape in `--generate` is never written: its tensors are drawn as the
loader reads them, `bench.scale.GeneratedLlama`, for a checkpoint larger
than the disk, e.g. the 33B shape's 65 GB);
OUT/growth.png plots peak RSS and step time against parameters. The last
line is one JSON object.
"""

import json
import pathlib

from absl import flags

from qlora_jax.bench import scale, scale_sweep, workers
from qlora_jax.engine import cli

_SHAPES = flags.DEFINE_list("shapes", ["1b", "3b", "7b", "13b"], "Shapes.")
_MODES = flags.DEFINE_list(
  "modes", ["qlora_nf4_dq", "lora_bf16", "lora_f32", "full"], "Modes."
)
_PEERS = flags.DEFINE_enum("peers", "auto", ["auto", "on", "off"], "PEFT.")
_OUT = flags.DEFINE_string("out", "results/bench_scale", "Output folder.")
_STEPS = flags.DEFINE_integer("steps", 3, "Training steps per run.")
_BATCH = flags.DEFINE_integer("batch", 1, "Rows per step.")
_SEQ = flags.DEFINE_integer("seq", 256, "Tokens per row.")
_RANK = flags.DEFINE_integer("rank", 16, "LoRA rank.")
_REMOVE = flags.DEFINE_bool(
  "remove_checkpoints", False, "Delete each shape's checkpoint after it."
)
_MARGIN = flags.DEFINE_float(
  "margin", 0.9, "Run only when the prediction is below this share of RAM."
)
_REDO = flags.DEFINE_bool(
  "redo", False, "Measure the runs named again; the new lines supersede."
)
_COLD = flags.DEFINE_bool(
  "cold",
  False,
  "Empty the page cache before each run (needs write access to "
  "/proc/sys/vm/drop_caches), so that every run reads its checkpoint "
  "from disk.",
)
_GENERATE = flags.DEFINE_list(
  "generate",
  [],
  "Shapes whose checkpoint is generated tensor by tensor as it is read "
  "instead of written to disk (for one the disk cannot hold, e.g. 33b); "
  "load time then includes drawing the weights. PEFT needs files: not run.",
)
_WORKER = flags.DEFINE_string("worker", None, "Internal: IMPL:MODE:FOLDER.")


def _sweep() -> scale_sweep.Sweep:
  return scale_sweep.Sweep(
    shapes=_SHAPES.value,
    modes=_MODES.value,
    out=pathlib.Path(_OUT.value),
    peers=False if _WORKER.value else workers.peers_available(_PEERS.value),
    steps=_STEPS.value,
    batch=_BATCH.value,
    seq=_SEQ.value,
    rank=_RANK.value,
    remove_checkpoints=_REMOVE.value,
    margin=_MARGIN.value,
    redo=_REDO.value,
    cold=_COLD.value,
    generate=tuple(_GENERATE.value),
  )


def _worker(spec: str, sweep: scale_sweep.Sweep) -> dict:
  impl, mode, folder = spec.split(":", 2)
  kw = {"batch": sweep.batch, "seq": sweep.seq, "rank": sweep.rank}
  kw["steps_run"] = sweep.steps
  if impl == "qlora_jax":
    if folder.startswith(scale_sweep.GENERATED):
      source = scale.generated_llama(folder[len(scale_sweep.GENERATED) :])
    else:
      source = pathlib.Path(folder)
    return scale.train_from_disk(source, mode, **kw)
  from experiments.peers import peft_scale  # noqa: PLC0415

  return peft_scale.train_from_disk(folder, mode, **kw)


def main(argv):
  del argv
  sweep = _sweep()
  if _WORKER.value:
    print(json.dumps(_worker(_WORKER.value, sweep)))
    return
  summary = scale_sweep.run(
    sweep, "experiments.bench_scale", lambda text: print(text, flush=True)
  )
  print(json.dumps(summary))


if __name__ == "__main__":
  cli.run(main)
