"""Speed of lm-eval requests through our backend (experiments.bench_eval).

One call measures one model in the current process: it runs a task twice
through lm-eval's `simple_evaluate` with our `JaxLM` (the first run pays
XLA's compiles, the second is warm) and reports the requests answered per
second of each, with the task's metrics (the same both times). The
requests/s count the seconds spent inside the model's request methods
(encoding and scoring: what a backend does), not lm-eval's building of
the task around them, which is the same for every backend.
"""

import time
from typing import Any

from qlora_jax import models
from qlora_jax.engine import profiling, setup, tasks
from qlora_jax.harness import evaluate

NF4_DQ = {"data_type": "nf4", "block_size": 64, "double_quant": True}


def _timed(method, seconds: list[float]):
  def timed(*args, **kwargs):
    t0 = time.perf_counter()
    try:
      return method(*args, **kwargs)
    finally:
      seconds[0] += time.perf_counter() - t0

  return timed


def timed_runs(lm, task: str, include_path: str, **kwargs) -> dict[str, Any]:
  """Seconds of a cold and a warm `simple_evaluate` of `task` on the
  lm-eval model `lm`, its request count and metrics (any backend: the
  peer script calls it with lm-eval's HFLM)."""
  import lm_eval  # noqa: PLC0415
  from lm_eval.tasks import TaskManager  # noqa: PLC0415

  inside = [0.0]
  for method in ("loglikelihood", "loglikelihood_rolling", "generate_until"):
    setattr(lm, method, _timed(getattr(lm, method), inside))
  out: dict[str, Any] = {}
  for run in ("cold", "warm"):
    inside[0] = 0.0
    t0 = time.perf_counter()
    results = lm_eval.simple_evaluate(
      model=lm,
      tasks=[task],
      task_manager=TaskManager(include_path=include_path),
      log_samples=True,
      **kwargs,
    )
    out[f"{run}_total_s"] = time.perf_counter() - t0
    out[f"{run}_s"] = inside[0]
  samples = results["samples"][task]
  out["documents"] = len(samples)
  out["requests"] = sum(len(s["arguments"]) for s in samples)
  out["metrics"] = {
    k.split(",")[0]: v
    for k, v in results["results"][task].items()
    if isinstance(v, float)
  }
  for run in ("cold", "warm"):
    out[f"{run}_requests_per_s"] = out["requests"] / out[f"{run}_s"]
  out["peak_rss_bytes"] = profiling.peak_rss_bytes()
  return out


def eval_speed(
  checkpoint: str,
  quantized: bool,
  task: str,
  include_path: str,
  batch_size: int,
  **kwargs,
) -> dict[str, Any]:
  """`timed_runs` of our backend on the checkpoint, float32 or NF4 + DQ."""
  evaluate.require_lm_eval()
  from qlora_jax.harness.backend import JaxLM  # noqa: PLC0415

  path = setup.resolve_checkpoint(checkpoint)
  lm = models.from_pretrained(
    path, quant=NF4_DQ if quantized else None, with_tokenizer=False
  )
  model = tasks.text_model(
    lm.model,
    lm.variables,
    lm.config,
    setup.load_tokenizer(path),
    checkpoint,
    batch_size=batch_size,
  )
  result = timed_runs(JaxLM(model), task, include_path, **kwargs)
  return {"impl": "qlora_jax", "quantized": quantized, **result}
