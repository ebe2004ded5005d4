"""lm-eval tasks on a `TextModel`: lm-eval's `simple_evaluate` when it is
installed, else the local multiple-choice tasks `native` runs alone.

lm-eval is imported only here and only when tasks run through it: without
it, `require_lm_eval` raises one line saying what to install.
"""

import importlib.util
import json
from collections.abc import Sequence
from typing import Any

from qlora_jax.harness import native
from qlora_jax.harness.lm import TextModel

INSTALL = "pip install lm-eval==0.4.13 (or pip install -e .[eval])"
BACKENDS = ("auto", "lm_eval", "native")


def has_lm_eval() -> bool:
  return importlib.util.find_spec("lm_eval") is not None


def require_lm_eval() -> None:
  """Raises ImportError saying what to install when lm-eval is missing."""
  if not has_lm_eval():
    raise ImportError(f"evaluating tasks needs lm-eval: {INSTALL}")


def evaluate(
  model: TextModel,
  tasks: Sequence[str],
  include_path: str | None = None,
  *,
  num_fewshot: int | None = None,
  limit: int | float | None = None,
  apply_chat_template: bool = False,
  log_samples: bool = False,
  seed: int = 0,
) -> dict[str, Any]:
  """lm_eval.simple_evaluate's results of `tasks` on the model."""
  require_lm_eval()
  import lm_eval
  from lm_eval.tasks import TaskManager

  from qlora_jax.harness.backend import JaxLM

  manager = TaskManager(include_path=include_path)
  return lm_eval.simple_evaluate(
    model=JaxLM(model),
    tasks=list(tasks),
    num_fewshot=num_fewshot,
    limit=limit,
    apply_chat_template=apply_chat_template,
    log_samples=log_samples,
    task_manager=manager,
    random_seed=seed,
  )


def resolve_backend(
  backend: str,
  tasks: Sequence[str],
  include_path: str | None,
  num_fewshot: int = 0,
) -> str:
  """ "lm_eval" or "native": the backend `run_tasks` will use, checked
  before any model loads.

  Raises:
    ImportError: lm-eval is needed (asked for, or a task only it runs)
      and missing; says what to install.
    ValueError: "native" asked for a task it cannot run, or a bad name.
  """
  if backend not in BACKENDS:
    raise ValueError(f"backend {backend!r} is not one of {BACKENDS}")
  if backend == "auto":
    backend = "lm_eval" if has_lm_eval() else "native"
    if backend == "native":
      try:
        native_tasks(tasks, include_path, num_fewshot)
      except native.Unsupported as e:
        raise ImportError(f"{e}: {INSTALL}") from e
  elif backend == "lm_eval":
    require_lm_eval()
  else:
    native_tasks(tasks, include_path, num_fewshot)
  return backend


def native_tasks(
  tasks: Sequence[str], include_path: str | None, num_fewshot: int = 0
) -> list[native.LocalTask]:
  """The tasks as `native` reads them (raises `native.Unsupported`)."""
  if num_fewshot:
    raise native.Unsupported("few-shot examples (num_fewshot > 0)")
  return [native.load(name, include_path) for name in tasks]


def run_tasks(
  model: TextModel,
  tasks: Sequence[str],
  include_path: str | None = None,
  *,
  backend: str = "auto",
  num_fewshot: int = 0,
  limit: int | None = None,
  apply_chat_template: bool = False,
) -> dict[str, float]:
  """{"task/metric": value} of each task (stderr included), through
  lm-eval or natively (`resolve_backend`); the same numbers either way."""
  if backend == "auto":
    backend = resolve_backend(backend, tasks, include_path, num_fewshot)
  if backend == "native":
    loaded = native_tasks(tasks, include_path, num_fewshot)
    return run_native(model, loaded, limit, apply_chat_template)
  if backend != "lm_eval":
    raise ValueError(f"backend {backend!r} is not one of {BACKENDS}")
  out: dict[str, float] = {}
  results = evaluate(
    model,
    tasks,
    include_path,
    num_fewshot=num_fewshot,
    limit=limit or None,
    apply_chat_template=apply_chat_template,
  )
  for task, metrics in results["results"].items():
    for key, value in metrics.items():
      metric, comma, filt = key.partition(",")
      if not comma or not isinstance(value, float | int):
        continue  # "alias", "sample_len": not metrics
      if isinstance(value, bool):
        continue
      if filt not in ("none", ""):
        metric = f"{metric},{filt}"
      out[f"{task}/{metric}"] = float(value)
  return out


def run_native(
  model: TextModel,
  loaded: Sequence[native.LocalTask],
  limit: int | None = None,
  apply_chat_template: bool = False,
) -> dict[str, float]:
  """`run_tasks`' results of tasks `native.load` has read."""
  out: dict[str, float] = {}
  for task in loaded:
    metrics = native.evaluate(model, task, limit, apply_chat_template)
    out.update({f"{task.name}/{k}": v for k, v in metrics.items()})
  return out


def headline(metrics: dict[str, float], task: str | None = None) -> dict:
  """Each task's first metric (the one a table shows), stderr aside; only
  `task`'s when named."""
  out = {}
  for key, value in metrics.items():
    name, _, metric = key.partition("/")
    if not metric or "stderr" in metric or (task and name != task):
      continue
    if not any(k.startswith(name + "/") for k in out):
      out[key] = value
  return out


def table(results: dict[str, Any]) -> str:
  """lm-eval's own results table (and its groups table, when any)."""
  require_lm_eval()
  from lm_eval.utils import make_table

  text = make_table(results)
  if results.get("groups"):
    text += "\n" + make_table(results, "groups")
  return text


def to_json(results: dict[str, Any]) -> str:
  """The results as JSON (values lm-eval leaves unserialisable as text)."""
  return json.dumps(results, indent=2, default=str) + "\n"
