"""lm-eval tasks run on a finished run or a checkpoint (experiments.evaluate).

A run is its 4-bit base with the unmerged adapters of a checkpoint
(`engine.restore`); a checkpoint alone (a Hugging Face folder, a GGUF file,
or a name such as "smollm2") loads with `models.from_pretrained`, float or
quantized. lm-eval is imported only here and only when tasks run: without
it, `require_lm_eval` raises one line saying what to install.
"""

import dataclasses
import importlib.util
import json
import pathlib
from typing import Any

from qlora_jax import models
from qlora_jax.data import Tokenizer
from qlora_jax.engine import restore, setup
from qlora_jax.engine.settings import DTYPES
from qlora_jax.harness import scoring

INSTALL = "pip install lm-eval==0.4.13 (or pip install -e .[eval])"


def require_lm_eval() -> None:
  """Raises ImportError saying what to install when lm-eval is missing."""
  if importlib.util.find_spec("lm_eval") is None:
    raise ImportError(f"evaluating tasks needs lm-eval: {INSTALL}")


@dataclasses.dataclass
class Loaded:
  """A model to evaluate, its tokenizer and a name for the results."""

  model: scoring.Model
  tokenizer: Tokenizer
  name: str
  end_ids: tuple[int, ...] = ()  # the model's EOS ids


def _loaded(lm, tokenizer, name: str, max_length: int | None) -> Loaded:
  if tokenizer is None:
    raise ValueError(f"{name}: no tokenizer, so texts cannot be encoded")
  if getattr(lm.config, "max_positions", None) is None and not max_length:
    raise ValueError(f"{name}: no context length: pass max_length")
  length = max_length or lm.config.max_positions
  model = scoring.Model(lm.model, lm.variables, length, tokenizer.pad_id)
  ends = tuple(getattr(lm.config, "eos_token_ids", ()))
  return Loaded(model, tokenizer, name, ends)


def load_run(
  workdir: str, step: int | None = None, max_length: int | None = None
) -> Loaded:
  """A run's base (quantized as it trained) with its unmerged adapters."""
  run = restore.restore(workdir, step)
  name = f"{workdir}@{run.step}"
  return _loaded(run.lm, run.tokenizer, name, max_length)


def load_checkpoint(
  checkpoint: str,
  quant: str = "none",
  dtype: str = "float32",
  max_length: int | None = None,
) -> Loaded:
  """A checkpoint alone; `quant` names a data type ("nf4", ...) to
  quantize its linear layers (output heads kept) on load."""
  path = setup.resolve_checkpoint(checkpoint)
  lm = models.from_pretrained(
    path,
    task="causal_lm",
    quant={"data_type": quant},
    dtype=DTYPES[dtype],
    base_dtype=DTYPES[dtype],
    with_tokenizer=False,
  )
  return _loaded(lm, setup.load_tokenizer(path), checkpoint, max_length)


def evaluate(
  loaded: Loaded,
  tasks: list[str],
  include_path: str | None = None,
  *,
  num_fewshot: int | None = None,
  limit: int | float | None = None,
  apply_chat_template: bool = False,
  batch_size: int = 8,
  log_samples: bool = False,
  seed: int = 0,
) -> dict[str, Any]:
  """lm_eval.simple_evaluate's results of `tasks` on the loaded model."""
  require_lm_eval()
  import lm_eval
  from lm_eval.tasks import TaskManager

  from qlora_jax.harness.backend import JaxLM

  lm = JaxLM(loaded.model, loaded.tokenizer, loaded.name, batch_size, seed=seed)
  manager = TaskManager(include_path=include_path)
  return lm_eval.simple_evaluate(
    model=lm,
    tasks=list(tasks),
    num_fewshot=num_fewshot,
    limit=limit,
    apply_chat_template=apply_chat_template,
    log_samples=log_samples,
    task_manager=manager,
    random_seed=seed,
  )


def table(results: dict[str, Any]) -> str:
  """lm-eval's own results table (and its groups table, when any)."""
  require_lm_eval()
  from lm_eval.utils import make_table

  text = make_table(results)
  if results.get("groups"):
    text += "\n" + make_table(results, "groups")
  return text


def write_json(results: dict[str, Any], out: str | pathlib.Path) -> None:
  """The results as JSON (values lm-eval leaves unserialisable as text)."""
  pathlib.Path(out).write_text(json.dumps(results, indent=2, default=str))
