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
  gets a line per run. Returns `summary` of every run done."""
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
  plot_growth(
    list(done.values()), sweep.out / "growth.png", sweep.batch, sweep.seq, ram
  )
  return summary(list(done.values()))


def _params(shape: str) -> float:
  f = families.FAMILY[shape]
  h, inter, layers = f["hidden"], f["mlp"], f["layers"]
  kv = f["kv"] * h // f["heads"]
  per_layer = 2 * h * h + 2 * h * kv + 3 * h * inter + 2 * h
  return layers * per_layer + 2 * families.VOCAB * h + h


def summary(runs: list[dict]) -> dict[str, Any]:
  """The figures of bench_scale's last line: per run, peak RSS against the
  prediction, tokens/s; at 7B, ours over PEFT + bitsandbytes'."""
  out: dict[str, Any] = {}
  by = {(r["shape"], r["impl"], r["mode"]): r for r in runs}
  for (shape, impl, mode), r in sorted(by.items()):
    key = f"{shape}_{impl}_{mode}"
    if "skipped" in r:
      out[f"{key}_skipped_predicted_gib"] = round(
        r["predicted_rss_bytes"] / 2**30, 2
      )
      continue
    if "error" in r:
      out[f"{key}_failed"] = True
      continue
    peak = r["train_peak_rss_bytes"]
    out[f"{key}_train_peak_gib"] = round(peak / 2**30, 3)
    out[f"{key}_load_peak_gib"] = round(r["load_peak_rss_bytes"] / 2**30, 3)
    out[f"{key}_load_s"] = round(r["load_s"], 1)
    out[f"{key}_tokens_per_s"] = round(r["tokens_per_s"], 2)
    out[f"{key}_finite"] = r["finite"]
    # The prediction: the memory model's step plus the process's measured
    # resident size before loading (python, jax, the compiled step).
    if impl == "qlora_jax":  # the model predicts our step, not PEFT's
      want = r.get("predicted_step_bytes", 0) + r.get("runtime_rss_bytes", 0)
      want = want or r["predicted_rss_bytes"]
      out[f"{key}_peak_over_predicted"] = round(peak / want, 3)
  for mode in ("qlora_nf4_dq", "lora_bf16"):
    ours, peer = (
      by.get(("7b", "qlora_jax", mode)),
      by.get(("7b", "peft_bnb", mode)),
    )
    if ours and peer and "step_s" in ours and "step_s" in peer:
      out[f"7b_{mode}_load_time_ratio"] = round(
        ours["load_s"] / peer["load_s"], 3
      )
      out[f"7b_{mode}_load_peak_ratio"] = round(
        ours["load_peak_rss_bytes"] / peer["load_peak_rss_bytes"], 3
      )
      out[f"7b_{mode}_train_peak_ratio"] = round(
        ours["train_peak_rss_bytes"] / peer["train_peak_rss_bytes"], 3
      )
      out[f"7b_{mode}_tokens_per_s_ratio"] = round(
        ours["tokens_per_s"] / peer["tokens_per_s"], 3
      )
  return out


def plot_growth(
  runs: list[dict],
  path: pathlib.Path,
  batch: int = 1,
  seq: int = 256,
  machine_bytes: int | None = None,
) -> None:
  """Peak training RSS and step time against parameters, per (impl, mode),
  with the memory model's prediction as dashed lines."""
  import matplotlib  # noqa: PLC0415

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # noqa: PLC0415

  fig, (ax_m, ax_t) = plt.subplots(1, 2, figsize=(11, 4.2))
  series: dict[tuple[str, str], list] = {}
  predicted: dict[str, list] = {}
  for r in runs:
    x = _params(r["shape"]) / 1e9
    if r["impl"] == "qlora_jax":
      predicted.setdefault(r["mode"], []).append(
        (x, r["predicted_rss_bytes"] / 2**30)
      )
    if "train_peak_rss_bytes" in r:
      series.setdefault((r["impl"], r["mode"]), []).append(
        (x, r["train_peak_rss_bytes"] / 2**30, r["step_s"])
      )
  for (impl, mode), pts in sorted(series.items()):
    pts.sort()
    style = "o-" if impl == "qlora_jax" else "s:"
    label = f"{'ours' if impl == 'qlora_jax' else 'PEFT+bnb'} {mode}"
    ax_m.plot([p[0] for p in pts], [p[1] for p in pts], style, label=label)
    ax_t.plot([p[0] for p in pts], [p[2] for p in pts], style, label=label)
  for mode, pts in sorted(predicted.items()):
    pts.sort()
    ax_m.plot(
      [p[0] for p in pts],
      [p[1] for p in pts],
      "--",
      alpha=0.5,
      label=f"memory model {mode}",
    )
  if machine_bytes:
    ax_m.axhline(machine_bytes / 2**30, color="k", lw=0.8, label="this machine")
  ax_m.set_yscale("log")
  ax_m.set(xlabel="parameters (B)", ylabel="peak RSS while training (GiB)")
  ax_t.set(
    xlabel="parameters (B)", ylabel=f"step time (s), batch {batch} x {seq}"
  )
  ax_m.legend(fontsize=7)
  ax_t.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
