"""bench_scale's sweep: which (shape, library, mode) runs, resumed from disk.

Each finished run is a line of OUT/runs.jsonl. A sweep skips the runs that
are there (failed runs are tried again, skipped ones decided again; `redo`
measures them again, the new line superseding the old), refuses to start a
run the memory model predicts will not fit, and runs the rest, one worker
process each.
"""

import dataclasses
import json
import os
import pathlib
import shutil
import time
from collections.abc import Callable
from typing import Any

import jax.numpy as jnp

from qlora_jax import models
from qlora_jax.bench import families, scale, workers
from qlora_jax.engine import memory, memory_check, recipes

GiB = 2**30
# Resident memory of a process before it loads anything (python, jax or
# torch, compiled step): added to the memory model's step figure.
RUNTIME_BYTES = {"qlora_jax": int(0.6 * GiB), "peft_bnb": int(0.6 * GiB)}
# A worker's folder argument for a checkpoint drawn as it is read.
GENERATED = "generated:"


@dataclasses.dataclass(frozen=True)
class Sweep:
  """What to run (the flags of experiments.bench_scale)."""

  shapes: list[str]
  modes: list[str]
  out: pathlib.Path
  peers: bool
  steps: int = 3
  batch: int = 1
  seq: int = 256
  rank: int = 16
  remove_checkpoints: bool = False
  margin: float = 0.9
  redo: bool = False
  cold: bool = False
  generate: tuple[str, ...] = ()

  def worker_flags(self) -> list[str]:
    return [
      f"--steps={self.steps}",
      f"--batch={self.batch}",
      f"--seq={self.seq}",
      f"--rank={self.rank}",
    ]


def predicted(sweep: Sweep, shape: str, mode: str) -> memory.Breakdown:
  """The memory model's figure for one run of the sweep."""
  config = models.from_dict(families.family_config_dict(shape))
  dtype = jnp.bfloat16 if mode == "lora_bf16" else jnp.float32
  lora, quant_plan, _, patterns = recipes.plan_inputs(mode, sweep.rank)
  base_dtype, embed_dtype = scale.frozen_dtypes(mode, sweep.rank)
  return memory.estimate(
    config,
    lora=lora,
    quant_plan=quant_plan,
    train_patterns=patterns,
    batch=sweep.batch,
    seq=sweep.seq,
    remat=True,
    dtype=dtype,
    base_dtype=base_dtype,
    embed_dtype=embed_dtype,
  )


def _with_prediction(r: dict, p: memory.Breakdown) -> dict:
  r["predicted_step_bytes"] = p.total
  r["predicted_rss_bytes"] = p.total + RUNTIME_BYTES[r["impl"]]
  r["predicted"] = {f: getattr(p, f) for f in memory.Breakdown.FIELDS}
  return r


def read_done(sweep: Sweep) -> dict[tuple, dict]:
  """The finished runs of OUT/runs.jsonl by (shape, impl, mode), compared
  with the memory model as it is now (failed and skipped runs left out)."""
  runs_file = sweep.out / "runs.jsonl"
  done = {}
  if runs_file.exists():
    for line in runs_file.read_text().splitlines():
      if line.strip():
        r = json.loads(line)
        if "error" not in r and "skipped" not in r:
          _with_prediction(r, predicted(sweep, r["shape"], r["mode"]))
          done[(r["shape"], r["impl"], r["mode"])] = r
  return done


def free_bytes() -> int:
  """MemAvailable of /proc/meminfo: what a new process can take now."""
  with open("/proc/meminfo") as f:
    for line in f:
      if line.startswith("MemAvailable:"):
        return int(line.split()[1]) * 1024
  return memory_check.available_memory()


def drop_page_cache() -> None:
  os.sync()
  try:
    pathlib.Path("/proc/sys/vm/drop_caches").write_text("1\n")
  except OSError as e:
    raise SystemExit(f"--cold: cannot empty the page cache: {e}") from e


def line(r: dict) -> str:
  """One run as text."""
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


def run(
  sweep: Sweep, module: str, report: Callable[[str], None]
) -> dict[str, Any]:
  """Runs what the sweep lacks, each in a worker of `module`; `report`
  gets a line per run. Returns `scale.summary` of every run done."""
  sweep.out.mkdir(parents=True, exist_ok=True)
  runs_file = sweep.out / "runs.jsonl"
  done = read_done(sweep)
  ram = memory_check.available_memory()
  impls = ["qlora_jax"] + (["peft_bnb"] if sweep.peers else [])
  report(f"machine memory {ram / GiB:.1f} GiB, {os.cpu_count()} CPUs")
  for shape in sweep.shapes:
    folder = None
    for mode in sweep.modes:
      p = predicted(sweep, shape, mode)
      for impl in impls:
        key = (shape, impl, mode)
        what = f"{shape:>4} {impl:<9} {mode:<13}"
        if key in done and not sweep.redo:
          report(f"{what} {line(done[key])} (before)")
          continue
        r = _with_prediction({"shape": shape, "impl": impl, "mode": mode}, p)
        need = r["predicted_rss_bytes"]
        generate = shape in sweep.generate
        if need > sweep.margin * ram:
          r["skipped"] = f"does not fit: predicted {need / GiB:.1f} GiB"
        elif generate and impl != "qlora_jax":
          r["skipped"] = "generated checkpoint: PEFT reads files only"
        elif need > free_bytes():  # other processes hold the rest now
          report(
            f"{what} not run now: predicted {need / GiB:.1f} GiB, "
            f"{free_bytes() / GiB:.1f} GiB free"
          )
          continue
        else:
          if generate:
            folder = GENERATED + shape
            r["generated"] = True
          elif folder is None:
            t0 = time.perf_counter()
            folder = scale.cached_llama(shape)
            report(
              f"{shape}: checkpoint {scale.checkpoint_bytes(folder) / 1e9:.1f}"
              f" GB at {folder} ({time.perf_counter() - t0:.0f} s)"
            )
          if sweep.cold:
            drop_page_cache()
          r["cold_cache"] = sweep.cold
          try:
            r.update(
              workers.run_worker(
                module, f"{impl}:{mode}:{folder}", sweep.worker_flags()
              )
            )
          except workers.WorkerError as e:
            r["error"] = str(e)
          r["shape"], r["impl"], r["mode"] = shape, impl, mode
        with runs_file.open("a") as f:
          f.write(json.dumps(r) + "\n")
        done[key] = r
        report(f"{what} {line(r)}")
    if sweep.remove_checkpoints and isinstance(folder, pathlib.Path):
      shutil.rmtree(folder)
  scale.plot_growth(
    list(done.values()), sweep.out / "growth.png", sweep.batch, sweep.seq, ram
  )
  return scale.summary(list(done.values()))
