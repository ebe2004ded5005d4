"""lm-eval requests per second: our backend (float and NF4 + DQ) against
lm-eval's Hugging Face backend (float, and bitsandbytes NF4 + DQ) on the
same task, model and machine, in the same run.

python -m experiments.bench_eval [--task stdlib_docstring_mc \
  --include_path tasks --limit 0 --batch_size 8 --checkpoint smollm2]

Needs lm-eval (`pip install lm-eval==0.4.13`); the HFLM rows need the
peers extra too. SmolLM2-135M-Instruct from its GGUF file by default
(HFLM reads the Hugging Face folder experiments.convert writes from it).
Each (implementation, weights) runs in its own process and evaluates the
task twice: cold (our first run pays XLA's compiles) and warm, timing the
model's request methods (lm-eval's task building, the same for both, is
printed as the total). Goal: ours
>= 1.5x HFLM's requests/s on multiple choice, float and NF4 + DQ. The
last line is one JSON object.
"""

import json
import os
import tempfile

from absl import flags

from qlora_jax.bench import evaluate, workers
from qlora_jax.engine import cli, setup
from qlora_jax.interop import gguf_convert

_CHECKPOINT = flags.DEFINE_string("checkpoint", "smollm2", "A GGUF file.")
_TASK = flags.DEFINE_string("task", "stdlib_docstring_mc", "An lm-eval task.")
_INCLUDE = flags.DEFINE_string("include_path", "tasks", "Its YAML folder.")
_LIMIT = flags.DEFINE_integer("limit", 0, "Documents (0: all).")
_BATCH = flags.DEFINE_integer("batch_size", 8, "Rows per model call.")
_CHAT = flags.DEFINE_bool("apply_chat_template", False, "Prompts as chats.")
_PEERS = flags.DEFINE_enum("peers", "auto", ["auto", "on", "off"], "HFLM.")
_WORKER = flags.DEFINE_string("worker", None, "Internal: IMPL:Q:DIR.")


def _task_kwargs() -> dict:
  return {
    "limit": _LIMIT.value or None,
    "apply_chat_template": _CHAT.value,
  }


def _worker(spec: str) -> None:
  impl, quantized, folder = spec.split(":", 2)
  args = (
    quantized == "1",
    _TASK.value,
    os.path.abspath(_INCLUDE.value),
    _BATCH.value,
  )
  if impl == "ours":
    result = evaluate.eval_speed(_CHECKPOINT.value, *args, **_task_kwargs())
  else:
    from experiments.peers import hf_eval  # noqa: PLC0415

    folder = os.path.join(folder, "hf")
    result = hf_eval.eval_speed(folder, *args, **_task_kwargs())
  print(json.dumps(result))


def main(argv):
  del argv
  if _WORKER.value:
    _worker(_WORKER.value)
    return
  peers = workers.peers_available(
    _PEERS.value, ("torch", "transformers", "bitsandbytes", "lm_eval")
  )
  path = setup.resolve_checkpoint(_CHECKPOINT.value)
  results = {}
  flags_ = [
    f"--checkpoint={_CHECKPOINT.value}",
    f"--task={_TASK.value}",
    f"--include_path={_INCLUDE.value}",
    f"--limit={_LIMIT.value}",
    f"--batch_size={_BATCH.value}",
    f"--apply_chat_template={_CHAT.value}",
  ]
  with tempfile.TemporaryDirectory() as folder:
    runs = [("ours", False), ("ours", True)]
    if peers:
      gguf_convert.convert(path, os.path.join(folder, "hf"))
      runs += [("hf", False), ("hf", True)]
    for impl, q in runs:
      spec = f"{impl}:{int(q)}:{folder}"
      r = workers.run_worker("experiments.bench_eval", spec, flags_)
      results[f"{impl}_{'nf4' if q else 'float'}"] = r
      print(
        f"{r['impl']:<14} {'nf4+dq' if q else 'float':<6}: {r['requests']} "
        f"requests, cold {r['cold_s']:6.1f} s ({r['cold_requests_per_s']:6.1f}"
        f"/s), warm {r['warm_s']:6.1f} s ({r['warm_requests_per_s']:6.1f}/s);"
        f" with lm-eval's task building {r['cold_total_s']:.1f} s and "
        f"{r['warm_total_s']:.1f} s; {json.dumps(r['metrics'])}",
        flush=True,
      )
  summary = {"task": _TASK.value, "peers": peers, "cpu_count": os.cpu_count()}
  for key, r in results.items():
    summary[f"{key}_requests"] = r["requests"]
    for run in ("cold", "warm"):
      summary[f"{key}_{run}_requests_per_s"] = round(
        r[f"{run}_requests_per_s"], 2
      )
  if peers:
    for q in ("float", "nf4"):
      for run in ("cold", "warm"):
        ratio = (
          results[f"ours_{q}"][f"{run}_requests_per_s"]
          / results[f"hf_{q}"][f"{run}_requests_per_s"]
        )
        summary[f"ours_vs_hflm_{q}_{run}"] = round(ratio, 3)
        print(f"{q} ({run}): ours {ratio:.2f}x lm-eval's HFLM requests/s")
  print(json.dumps(summary))


if __name__ == "__main__":
  cli.run(main)
