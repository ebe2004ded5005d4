"""The largest Llama that trains here, against the memory model and PEFT.

python -m experiments.bench_scale [--shapes 1b,3b,7b,13b]
  [--modes qlora_nf4_dq,lora_bf16,lora_f32,full] [--peers auto|on|off]
  [--out results/bench_scale] [--remove_checkpoints] [--redo] [--cold]
  [--generate 33b]

For each Llama shape (`engine.memory.FAMILY`): a Hugging Face folder with
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
import os
import pathlib
import shutil
import subprocess
import sys
import time

import jax.numpy as jnp
from absl import app, flags

from qlora_jax import models
from qlora_jax.bench import scale
from qlora_jax.engine import console, memory, modes

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

GiB = 2**30
# Resident memory of a process before it loads anything (python, jax or
# torch, compiled step): added to the memory model's step figure.
RUNTIME_BYTES = {"qlora_jax": int(0.6 * GiB), "peft_bnb": int(0.6 * GiB)}


GENERATED = "generated:"


def _worker(spec: str) -> None:
  impl, mode, folder = spec.split(":", 2)
  kw = {"batch": _BATCH.value, "seq": _SEQ.value, "rank": _RANK.value}
  kw["steps_run"] = _STEPS.value
  if impl == "qlora_jax":
    if folder.startswith(GENERATED):
      source = scale.generated_llama(folder[len(GENERATED) :])
    else:
      source = pathlib.Path(folder)
    result = scale.train_from_disk(source, mode, **kw)
  else:
    from experiments.peers import peft_scale  # noqa: PLC0415

    result = peft_scale.train_from_disk(folder, mode, **kw)
  print(json.dumps(result))


def _drop_page_cache() -> None:
  os.sync()
  try:
    pathlib.Path("/proc/sys/vm/drop_caches").write_text("1\n")
  except OSError as e:
    raise SystemExit(f"--cold: cannot empty the page cache: {e}") from e


def _run(impl: str, mode: str, folder: pathlib.Path | str) -> dict:
  cmd = [
    sys.executable,
    "-m",
    "experiments.bench_scale",
    f"--worker={impl}:{mode}:{folder}",
    f"--steps={_STEPS.value}",
    f"--batch={_BATCH.value}",
    f"--seq={_SEQ.value}",
    f"--rank={_RANK.value}",
  ]
  proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
  if proc.returncode != 0:
    return {"error": f"exit {proc.returncode}: {proc.stderr[-2000:]}"}
  return json.loads(proc.stdout.strip().splitlines()[-1])


def _predicted(shape: str, mode: str) -> memory.Breakdown:
  config = models.from_dict(memory.family_config_dict(shape))
  dtype = jnp.bfloat16 if mode == "lora_bf16" else jnp.float32
  lora, quant_plan, _, patterns = modes.plan_inputs(mode, _RANK.value)
  base_dtype, embed_dtype = scale.frozen_dtypes(mode, _RANK.value)
  return memory.predict(
    config,
    lora=lora,
    quant_plan=quant_plan,
    train_patterns=patterns,
    batch=_BATCH.value,
    seq=_SEQ.value,
    remat=True,
    dtype=dtype,
    base_dtype=base_dtype,
    embed_dtype=embed_dtype,
  )


def _free_bytes() -> int:
  """MemAvailable of /proc/meminfo: what a new process can take now."""
  with open("/proc/meminfo") as f:
    for line in f:
      if line.startswith("MemAvailable:"):
        return int(line.split()[1]) * 1024
  return memory.available_memory()


def _peers_available() -> bool:
  if _PEERS.value != "auto":
    return _PEERS.value == "on"
  probe = subprocess.run(
    [sys.executable, "-c", "import torch, transformers, peft, bitsandbytes"],
    capture_output=True,
    check=False,
  )
  return probe.returncode == 0


def _line(r: dict) -> str:
  if "skipped" in r:
    return r["skipped"]
  if "error" in r:
    return "failed: " + r["error"].strip().splitlines()[-1][:200]
  return (
    f"load {r['load_s']:.0f} s (peak {r['load_peak_rss_bytes'] / GiB:.2f} "
    f"GiB), train peak {r['train_peak_rss_bytes'] / GiB:.2f} GiB "
    f"(predicted {r['predicted_rss_bytes'] / GiB:.2f}), step "
    f"{r['step_s']:.1f} s, {r['tokens_per_s']:.1f} tokens/s, losses "
    + ", ".join(f"{x:.3f}" for x in r["losses"])
  )


def main(argv):
  del argv
  console.configure_logging()
  if _WORKER.value:
    _worker(_WORKER.value)
    return
  out = pathlib.Path(_OUT.value)
  out.mkdir(parents=True, exist_ok=True)
  runs_file = out / "runs.jsonl"
  done = {}
  if runs_file.exists():
    for line in runs_file.read_text().splitlines():
      if line.strip():
        r = json.loads(line)
        # A failed run is tried again; a skipped one decided again.
        if "error" not in r and "skipped" not in r:
          # Compared with the memory model as it is now.
          p = _predicted(r["shape"], r["mode"])
          r["predicted_step_bytes"] = p.total
          r["predicted_rss_bytes"] = p.total + RUNTIME_BYTES[r["impl"]]
          r["predicted"] = {f: getattr(p, f) for f in memory.Breakdown.FIELDS}
          done[(r["shape"], r["impl"], r["mode"])] = r
  ram = memory.available_memory()
  impls = ["qlora_jax"] + (["peft_bnb"] if _peers_available() else [])
  print(
    f"machine memory {ram / GiB:.1f} GiB, {os.cpu_count()} CPUs", flush=True
  )
  for shape in _SHAPES.value:
    folder = None
    for mode in _MODES.value:
      p = _predicted(shape, mode)
      for impl in impls:
        key = (shape, impl, mode)
        if key in done and not _REDO.value:
          print(f"{shape:>4} {impl:<9} {mode:<13} {_line(done[key])} (before)")
          continue
        need = p.total + RUNTIME_BYTES[impl]
        r = {"shape": shape, "impl": impl, "mode": mode}
        r["predicted_rss_bytes"] = need
        r["predicted_step_bytes"] = p.total
        r["predicted"] = {f: getattr(p, f) for f in memory.Breakdown.FIELDS}
        generate = shape in _GENERATE.value
        if need > _MARGIN.value * ram:
          r["skipped"] = f"does not fit: predicted {need / GiB:.1f} GiB"
        elif generate and impl != "qlora_jax":
          r["skipped"] = "generated checkpoint: PEFT reads files only"
        elif need > _free_bytes():  # other processes hold the rest now
          print(
            f"{shape:>4} {impl:<9} {mode:<13} not run now: predicted "
            f"{need / GiB:.1f} GiB, {_free_bytes() / GiB:.1f} GiB free",
            flush=True,
          )
          continue
        else:
          if generate:
            folder = GENERATED + shape
            r["generated"] = True
          elif folder is None:
            t0 = time.perf_counter()
            folder = scale.cached_llama(shape)
            print(
              f"{shape}: checkpoint {scale.checkpoint_bytes(folder) / 1e9:.1f}"
              f" GB at {folder} ({time.perf_counter() - t0:.0f} s)",
              flush=True,
            )
          if _COLD.value:
            _drop_page_cache()
          r["cold_cache"] = _COLD.value
          r.update(_run(impl, mode, folder))
          r["shape"], r["impl"], r["mode"] = shape, impl, mode
        with runs_file.open("a") as f:
          f.write(json.dumps(r) + "\n")
        done[key] = r
        print(f"{shape:>4} {impl:<9} {mode:<13} {_line(r)}", flush=True)
    if _REMOVE.value and isinstance(folder, pathlib.Path):
      shutil.rmtree(folder)
  scale.plot_growth(
    list(done.values()), out / "growth.png", _BATCH.value, _SEQ.value, ram
  )
  print(json.dumps(scale.summary(list(done.values()))))


if __name__ == "__main__":
  app.run(main)
