"""lm-eval tasks on a model the engine loads: a finished run (its 4-bit
base with the unmerged adapters of a checkpoint, `restore`), a checkpoint
alone (a Hugging Face folder, a GGUF file, or a name such as "smollm2";
float or quantized on load), or a training run's current state (the
`eval.tasks` of its config, at each evaluation).
"""

import pathlib

from qlora_jax import models
from qlora_jax import nn as qnn
from qlora_jax.engine import outputs, restore, setup
from qlora_jax.engine.settings import DTYPES, EvalSettings
from qlora_jax.harness import evaluate, native, scoring
from qlora_jax.harness.lm import TextModel


def text_model(
  module,
  variables,
  config,
  tokenizer,
  name: str,
  max_length: int | None = None,
  batch_size: int = 8,
  seed: int = 0,
) -> TextModel:
  """The model as lm-eval's requests see it."""
  if tokenizer is None:
    raise ValueError(f"{name}: no tokenizer, so texts cannot be encoded")
  if getattr(config, "max_positions", None) is None and not max_length:
    raise ValueError(f"{name}: no context length: pass max_length")
  length = max_length or config.max_positions
  model = scoring.Model(module, variables, length, tokenizer.pad_id)
  ends = tuple(getattr(config, "eos_token_ids", ()))
  return TextModel(model, tokenizer, name, batch_size, seed=seed, end_ids=ends)


def load_run(
  workdir: str,
  step: int | None = None,
  max_length: int | None = None,
  batch_size: int = 8,
) -> TextModel:
  """A run's base (quantized as it trained) with its unmerged adapters."""
  run = restore.restore(workdir, step)
  lm = run.lm
  return text_model(
    lm.model,
    lm.variables,
    lm.config,
    run.tokenizer,
    f"{workdir}@{run.step}",
    max_length,
    batch_size,
  )


def load_checkpoint(
  checkpoint: str,
  quant: str = "none",
  dtype: str = "float32",
  max_length: int | None = None,
  batch_size: int = 8,
) -> TextModel:
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
  tokenizer = setup.load_tokenizer(path)
  return text_model(
    lm.model,
    lm.variables,
    lm.config,
    tokenizer,
    checkpoint,
    max_length,
    batch_size,
  )


class DuringTraining:
  """A run's `eval.tasks`, run on its current adapters at each evaluation.

  The backend is settled (and a missing lm-eval reported) when the run
  sets up, before the model loads.
  """

  def __init__(self, e: EvalSettings, default_batch_size: int):
    self.settings = e
    self.batch_size = e.batch_size or default_batch_size
    self.backend = evaluate.resolve_backend(
      e.backend, e.tasks, e.include_path or None, e.num_fewshot
    )
    self.native = None  # read once, not at each evaluation
    if self.backend == "native":
      self.native = evaluate.native_tasks(
        e.tasks, e.include_path or None, e.num_fewshot
      )

  def columns(self) -> list[str]:
    """The console's column of each task: "task/metric" of its first
    metric where its YAML under include_path names it, else the task."""
    e = self.settings
    out = []
    for name in e.tasks:
      try:
        out.append(f"{name}/{native.first_metric(name, e.include_path)}")
      except native.Unsupported:
        out.append(name)
    return out

  def __call__(self, module, params, frozen, config, tokenizer) -> dict:
    """{"task/metric": value} of the model with trainable `params`."""
    e = self.settings
    model = text_model(
      module,
      qnn.merge_trees(params, frozen),
      config,
      tokenizer,
      "training",
      batch_size=self.batch_size,
    )
    if self.native is not None:
      return evaluate.run_native(
        model, self.native, e.limit or None, e.apply_chat_template
      )
    return evaluate.run_tasks(
      model,
      e.tasks,
      e.include_path or None,
      backend=self.backend,
      num_fewshot=e.num_fewshot,
      limit=e.limit or None,
      apply_chat_template=e.apply_chat_template,
    )


def write_results(
  results: dict,
  out: str,
  overwrite: bool = False,
  workdir: str | None = None,
  checkpoint: str | None = None,
) -> None:
  """lm-eval's results JSON at `out`, written whole (`outputs.writing`):
  never into the evaluated run or over the checkpoint, an existing file
  only with `overwrite`."""
  keep_off = _keep_off(workdir, checkpoint)
  with outputs.writing(
    out, folder=False, overwrite=overwrite, keep_off=keep_off
  ) as tmp:
    tmp.write_text(evaluate.to_json(results))


def check_out(
  out: str,
  overwrite: bool = False,
  workdir: str | None = None,
  checkpoint: str | None = None,
) -> None:
  """`write_results`' refusals, before anything loads."""
  keep_off = _keep_off(workdir, checkpoint)
  outputs.check(out, folder=False, overwrite=overwrite, keep_off=keep_off)


def _keep_off(workdir, checkpoint) -> outputs.KeepOff:
  if checkpoint and not pathlib.Path(checkpoint).exists():
    checkpoint = None  # a name ("smollm2"), not a path
  return [("the evaluated run", workdir), ("the checkpoint", checkpoint)]
