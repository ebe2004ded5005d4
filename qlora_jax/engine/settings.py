"""A run's config, checked once and turned into typed settings.

`Settings.from_config(config)` reads every field of an `ml_collections`
config (configs/base.py has them all, with their defaults and a comment
each) in one pass: a missing or unknown field, a value of the wrong type
(a fractional rank, a string where a number belongs) or out of range is an
error naming the field ("quant.block_size"); all such errors of a config
are reported together. Each rule has one owner: the objects the sections
become check their own fields (`quant.QuantSpec`, `nn.LoraSpec`,
`nn.LoraTargets`, `optim.OptSettings`, raising `quant.SpecError`), and
this module prefixes the section; it checks only what no one object
owns (fields of its own sections, rules across sections). Nothing below
the engine's setup sees the ConfigDict: models, data, the optimizer,
checkpoints and the console take these typed values.
"""

import dataclasses
import re
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp

from qlora_jax import nn as qnn
from qlora_jax.engine.dpo_loss import DpoSettings
from qlora_jax.engine.grpo_loss import GrpoSettings
from qlora_jax.engine.optim import OptSettings
from qlora_jax.engine.typed_config import ConfigError, plain, read_section
from qlora_jax.harness.evaluate import BACKENDS
from qlora_jax.nn import KERNELS
from qlora_jax.quant import SpecError

CLASSIFICATION = "classification"
CAUSAL_LM = "causal_lm"
RUN_TASKS = (CLASSIFICATION, CAUSAL_LM)
TRAIN_MODES = ("lora", "full")
# train.objective: the loss a run minimizes.
OBJECTIVES = ("sft", "dpo", "grpo")
DATA_SOURCES = (
  "stdlib_docstrings",
  "stdlib_questions",
  "assistant",
  "jsonl",
  "text",
  "synthetic",
)
# model.dtype / base_dtype / embed_dtype: the run's float dtypes by name.
DTYPES = {
  "float32": jnp.float32,
  "bfloat16": jnp.bfloat16,
  "float16": jnp.float16,
}
TEXT_SPLITS = ("paragraph", "line")
# eval.backend: lm-eval when installed ("auto"), lm-eval, or the local
# multiple-choice tasks `harness.native` runs without it.
EVAL_BACKENDS = BACKENDS


@dataclasses.dataclass(frozen=True)
class ModelSettings:
  checkpoint: str
  task: str
  dtype: str
  base_dtype: str
  embed_dtype: str
  scan_layers: bool
  remat: bool
  hf_config: dict
  matmul_kernel: str
  adapter: str


@dataclasses.dataclass(frozen=True)
class QuantSettings:
  data_type: str
  block_size: int
  double_quant: bool
  targets: str | list
  exclude: str

  def targets_spec(self) -> qnn.QuantTargets | None:
    """The quantization these fields give; None for a float base (data
    type "none"). Raises `SpecError` naming the field."""
    return qnn.QuantTargets.parse(dataclasses.asdict(self))


@dataclasses.dataclass(frozen=True)
class LoraSettings:
  enabled: bool
  rank: int
  alpha: float
  targets: str | list
  exclude: str
  rank_pattern: dict
  alpha_pattern: dict
  rslora: bool
  dropout: float
  init: str
  loftq_iters: int
  dora: bool
  qa: bool

  def targets_spec(self) -> qnn.LoraTargets:
    """The adapters these fields give (whether or not `enabled`). Raises
    `SpecError` naming the field."""
    out = dataclasses.asdict(self)
    del out["enabled"]
    return qnn.LoraTargets.parse(out)


@dataclasses.dataclass(frozen=True)
class DataSettings:
  source: str
  train_path: str
  eval_path: str
  max_length: int
  packing: bool
  instruction: bool
  chat_template: str
  text_split: str
  synthetic_examples: int
  synthetic_eval_examples: int
  eval_generate: int
  max_new_tokens: int
  questions_per_class: int
  eval_questions_per_class: int


@dataclasses.dataclass(frozen=True)
class TrainSettings:
  mode: str
  objective: str
  train_modules: list
  seed: int
  batch_size: int
  grad_accum: int
  epochs: int
  steps: int
  eval_every: int
  checkpoint_every: int
  keep_checkpoints: int
  log_every: int
  show_predictions: int
  memory_check: str


@dataclasses.dataclass(frozen=True)
class EvalSettings:
  """lm-eval tasks run at each evaluation of a causal LM (`engine.tasks`)."""

  tasks: list
  include_path: str
  num_fewshot: int
  limit: int
  apply_chat_template: bool
  batch_size: int
  backend: str


@dataclasses.dataclass(frozen=True)
class MeshSettings:
  data: int
  fsdp: int


@dataclasses.dataclass(frozen=True)
class DistributedSettings:
  enabled: bool
  coordinator_address: str | None
  num_processes: int | None
  process_id: int | None
  cpu_collectives: str | None


_SECTIONS = {
  "model": ModelSettings,
  "quant": QuantSettings,
  "lora": LoraSettings,
  "data": DataSettings,
  "opt": OptSettings,
  "train": TrainSettings,
  "dpo": DpoSettings,
  "grpo": GrpoSettings,
  "eval": EvalSettings,
  "mesh": MeshSettings,
  "distributed": DistributedSettings,
}


@dataclasses.dataclass(frozen=True)
class Settings:
  """Every section of a run's config, typed and checked."""

  model: ModelSettings
  quant: QuantSettings
  lora: LoraSettings
  data: DataSettings
  opt: OptSettings
  train: TrainSettings
  dpo: DpoSettings
  grpo: GrpoSettings
  eval: EvalSettings
  mesh: MeshSettings
  distributed: DistributedSettings
  # Built once from `lora` / `quant` (and `train.mode`) by `from_config`.
  lora_targets: qnn.LoraTargets | None = None
  quant_targets: qnn.QuantTargets | None = None

  @classmethod
  def from_config(cls, config: Any) -> "Settings":
    """Checks `config` (a ConfigDict or nested mapping) in one pass.

    Raises:
      ConfigError: one line per bad field, each naming it.
    """
    plain_config = plain(config)
    errors: list[str] = []
    if not isinstance(plain_config, Mapping):
      raise ConfigError(f"config: expected a mapping, got {type(plain_config)}")
    for name in sorted(set(plain_config) - set(_SECTIONS)):
      errors.append(f"{name}: unknown config section")
    sections = {}
    for name, kind in _SECTIONS.items():
      if name not in plain_config or not isinstance(
        plain_config[name], Mapping
      ):
        errors.append(f"{name}: missing config section")
        continue
      section = read_section(name, kind, plain_config[name], errors)
      if section is not None:
        sections[name] = section
    targets = _targets(sections, errors)
    _check(sections, targets, errors)
    if not errors:
      return cls(**sections, **targets)
    raise ConfigError("bad config:\n  " + "\n  ".join(errors))

  def to_dict(self) -> dict:
    """The config's sections as plain values (what config.json holds)."""
    return {name: dataclasses.asdict(getattr(self, name)) for name in _SECTIONS}

  def lora_plan(self) -> qnn.LoraTargets | None:
    """The adapters, or None for none (train.mode "full" or lora.enabled
    False)."""
    return self.lora_targets

  def quant_plan(self) -> qnn.QuantTargets | None:
    """The quantization of the frozen base, or None for a float base."""
    return self.quant_targets

  def train_patterns(self) -> list[str]:
    """Regexes of base variables that train (every one in mode "full")."""
    return (
      [".*"] if self.train.mode == "full" else list(self.train.train_modules)
    )


# Fields added after runs were first recorded, with the value every older
# run had: a recorded config.json without them reads as that run was made
# (`recorded`); a config given for a new run must still name every field.
ADDED_FIELDS = {
  "lora.qa": False,
  "train.memory_check": "off",
  "model.embed_dtype": "",
  "train.objective": "sft",
  "dpo.beta": 0.1,
  "dpo.loss": "sigmoid",
  "dpo.label_smoothing": 0.0,
  "grpo.group_size": 4,
  "grpo.temperature": 1.0,
  "grpo.top_p": 1.0,
  "grpo.max_new_tokens": 16,
  "grpo.mu": 1,
  "grpo.epsilon": 0.2,
  "grpo.epsilon_high": 0.0,
  "grpo.beta": 0.0,
  "grpo.scale_rewards": True,
  "grpo.reward": "exact",
  "grpo.answer_field": "answer",
  "grpo.pass_reward": 1.0,
  "eval.tasks": [],
  "eval.include_path": "",
  "eval.num_fewshot": 0,
  "eval.limit": 0,
  "eval.apply_chat_template": False,
  "eval.batch_size": 0,
  "eval.backend": "auto",
  "data.chat_template": "",
}
# Sections added whole after runs were first recorded.
ADDED_SECTIONS = ("dpo", "eval", "grpo")


def recorded(config: Mapping[str, Any]) -> dict[str, Any]:
  """A run's recorded config (its config.json) with `ADDED_FIELDS` filled
  in where it predates them."""
  if not isinstance(config, Mapping):
    return config
  out = {k: dict(v) if isinstance(v, Mapping) else v for k, v in config.items()}
  for key, value in ADDED_FIELDS.items():
    section, field = key.split(".")
    if section in ADDED_SECTIONS and section not in out:
      out[section] = {}
    if isinstance(out.get(section), dict):
      out[section].setdefault(field, value)
  return out


def _targets(sec: dict[str, Any], errors: list[str]) -> dict[str, Any]:
  """`lora_targets` and `quant_targets`, built once by their owners
  (`nn.LoraTargets`, `nn.QuantTargets`) from the sections that parsed;
  their `SpecError`s become errors naming "lora.<field>" / "quant.<field>"."""
  out: dict[str, Any] = {"lora_targets": None, "quant_targets": None}
  lo, q, t = sec.get("lora"), sec.get("quant"), sec.get("train")
  full = t is not None and t.mode == "full"
  lora = quant = None
  if lo is not None:
    try:
      lora = lo.targets_spec()
    except SpecError as e:
      errors.append(f"lora.{e.field}: {e.reason}")
  if q is not None:
    try:
      quant = q.targets_spec()
    except SpecError as e:
      errors.append(f"quant.{e.field}: {e.reason}")
  if lora is not None and q is not None and lo.enabled and not full:
    try:
      qnn.check_pair(lora, quant)
    except SpecError as e:
      errors.append(f"lora.{e.field}: {e.reason}")
  if full and quant is not None:
    errors.append(
      "quant.data_type: train.mode 'full' trains the base: set "
      f"quant.data_type to {qnn.FLOAT!r}"
    )
  if lo is not None and lo.enabled and not full:
    out["lora_targets"] = lora
  if not full:
    out["quant_targets"] = quant
  return out


def _check(
  sec: dict[str, Any], targets: dict[str, Any], errors: list[str]
) -> None:
  """Range and consistency checks that no one typed object owns: fields
  of this module's own sections and rules across sections."""

  def bad(field, message):
    errors.append(f"{field}: {message}")

  def choice(field, value, allowed):
    if value not in allowed:
      bad(field, f"unknown value {value!r}, expected one of {allowed}")

  def at_least(field, value, low):
    if value < low:
      bad(field, f"must be >= {low}, got {value}")

  m, lo, d, t, mesh, e = (
    sec.get(k) for k in ("model", "lora", "data", "train", "mesh", "eval")
  )
  if m:
    choice("model.task", m.task, RUN_TASKS)
    choice("model.dtype", m.dtype, tuple(DTYPES))
    choice("model.base_dtype", m.base_dtype, tuple(DTYPES))
    choice("model.embed_dtype", m.embed_dtype, ("",) + tuple(DTYPES))
    choice("model.matmul_kernel", m.matmul_kernel, KERNELS)
    if not m.checkpoint and not m.hf_config:
      bad(
        "model.checkpoint",
        "empty: set it, or set model.hf_config for a randomly initialised "
        "model",
      )
    if m.adapter and not m.checkpoint:
      bad("model.adapter", "needs model.checkpoint: the adapter's base")
    if m.adapter and lo and t and targets["lora_targets"] is None:
      bad(
        "model.adapter",
        "is set, but lora.enabled is False or train.mode is 'full': an "
        "adapter needs LoRA training",
      )
  if d:
    choice("data.source", d.source, DATA_SOURCES)
    choice("data.text_split", d.text_split, TEXT_SPLITS)
    at_least("data.max_length", d.max_length, 2)
    at_least("data.synthetic_examples", d.synthetic_examples, 1)
    at_least("data.synthetic_eval_examples", d.synthetic_eval_examples, 1)
    at_least("data.eval_generate", d.eval_generate, 0)
    at_least("data.max_new_tokens", d.max_new_tokens, 1)
    if d.source in ("jsonl", "text"):
      for field in ("train_path", "eval_path"):
        if not getattr(d, field):
          bad(f"data.{field}", f"empty, but data.source is {d.source!r}")
    if d.source == "synthetic" and m and not m.hf_config.get("vocab_size"):
      bad("data.source", "'synthetic' needs model.hf_config['vocab_size']")
    if d.eval_generate and m and m.task != CAUSAL_LM:
      bad("data.eval_generate", "answers by generation need a causal_lm")
    if d.eval_generate and not d.instruction:
      bad("data.eval_generate", "needs instruction data (data.instruction)")
    if d.source in ("stdlib_questions", "assistant"):
      if not d.instruction:
        bad("data.instruction", f"data.source {d.source!r} needs True")
      if m and m.task != CAUSAL_LM:
        bad("data.source", f"{d.source!r} is a causal_lm task")
    at_least("data.questions_per_class", d.questions_per_class, 1)
    at_least("data.eval_questions_per_class", d.eval_questions_per_class, 1)
  if t:
    choice("train.mode", t.mode, TRAIN_MODES)
    for pattern in t.train_modules:
      try:
        re.compile(pattern)
      except (re.error, TypeError) as e:
        bad("train.train_modules", f"{pattern!r} is not a regex: {e}")
    at_least("train.batch_size", t.batch_size, 1)
    at_least("train.grad_accum", t.grad_accum, 1)
    if t.grad_accum >= 1 and t.batch_size % t.grad_accum:
      bad(
        "train.batch_size",
        f"{t.batch_size} is not divisible by train.grad_accum ({t.grad_accum})",
      )
    at_least("train.epochs", t.epochs, 0)
    at_least("train.steps", t.steps, 0)
    if not t.epochs and not t.steps:
      bad("train.steps", "train.epochs and train.steps are both 0")
    at_least("train.eval_every", t.eval_every, 0)
    at_least("train.checkpoint_every", t.checkpoint_every, 0)
    at_least("train.keep_checkpoints", t.keep_checkpoints, 1)
    at_least("train.log_every", t.log_every, 1)
    at_least("train.show_predictions", t.show_predictions, 0)
    choice("train.objective", t.objective, OBJECTIVES)
    if t.objective == "dpo":
      _check_dpo(sec, targets, bad)
    if t.objective == "grpo":
      _check_grpo(sec, targets, bad)
    if t.memory_check not in ("error", "warn", "off"):
      bad(
        "train.memory_check",
        f"{t.memory_check!r} is not one of 'error', 'warn', 'off'",
      )
  if e:
    _check_eval(e, m, bad)
  if mesh:
    for field in ("data", "fsdp"):
      value = getattr(mesh, field)
      if value != -1 and value < 1:
        bad(f"mesh.{field}", f"must be -1 or >= 1, got {value}")
    if mesh.data == -1 and mesh.fsdp == -1:
      bad("mesh", "only one of mesh.data and mesh.fsdp may be -1")


def _check_eval(e: EvalSettings, m: ModelSettings | None, bad) -> None:
  """eval.*: lm-eval tasks of a causal LM (the tasks themselves, and
  whether lm-eval is there to run them, are checked when the run sets
  up, `engine.tasks`)."""
  if not all(isinstance(t, str) and t for t in e.tasks):
    bad("eval.tasks", f"must be a list of task names, got {e.tasks!r}")
  elif e.tasks and m and m.task != CAUSAL_LM:
    bad("eval.tasks", "lm-eval tasks need model.task 'causal_lm'")
  if e.num_fewshot < 0:
    bad("eval.num_fewshot", f"must be >= 0, got {e.num_fewshot}")
  if e.limit < 0:
    bad("eval.limit", f"must be >= 0 (0: every document), got {e.limit}")
  if e.batch_size < 0:
    bad(
      "eval.batch_size",
      f"must be >= 0 (0: train.batch_size), got {e.batch_size}",
    )
  if e.backend not in EVAL_BACKENDS:
    bad(
      "eval.backend",
      f"unknown value {e.backend!r}, expected one of {EVAL_BACKENDS}",
    )


def _check_dpo(sec: dict[str, Any], targets: dict[str, Any], bad) -> None:
  """train.objective "dpo": a causal LM with adapters that start at zero
  (its reference is the base with adapters off), on JSONL pairs."""
  m, lo, d = (sec.get(k) for k in ("model", "lora", "data"))
  if m and m.task != CAUSAL_LM:
    bad("train.objective", "'dpo' needs model.task 'causal_lm'")
  if targets["lora_targets"] is None:
    bad(
      "train.objective",
      "'dpo' takes its reference from the base with adapters off: it needs "
      "adapters (lora.enabled True, train.mode 'lora')",
    )
  if lo and lo.init not in ("kaiming", "gaussian"):
    bad(
      "lora.init",
      f"{lo.init!r} starts the adapters away from zero, so the base with "
      "adapters off is not the starting policy that train.objective 'dpo' "
      "needs as its reference: use 'kaiming' or 'gaussian'",
    )
  if m and m.adapter:
    bad(
      "model.adapter",
      "train.objective 'dpo' starts from zero adapters (its reference is "
      "the base with adapters off)",
    )
  if d and d.source != "jsonl":
    bad("data.source", "train.objective 'dpo' reads pairs from 'jsonl' files")
  if d and d.packing:
    bad("data.packing", "train.objective 'dpo' scores one pair per row")


def _check_grpo(sec: dict[str, Any], targets: dict[str, Any], bad) -> None:
  """train.objective "grpo": a causal LM answering prompts (JSONL, or
  the docstring questions) in one process; grpo.mu divides the step
  counts, so that every checkpoint falls between generation batches."""
  m, lo, d, t, g = (
    sec.get(k) for k in ("model", "lora", "data", "train", "grpo")
  )
  if m and m.task != CAUSAL_LM:
    bad("train.objective", "'grpo' needs model.task 'causal_lm'")
  if d and d.source not in ("jsonl", "stdlib_questions"):
    bad(
      "data.source",
      "train.objective 'grpo' reads prompts from 'jsonl' or "
      f"'stdlib_questions', got {d.source!r}",
    )
  if d and d.packing:
    bad("data.packing", "train.objective 'grpo' holds one completion per row")
  if d and d.eval_generate:
    bad(
      "data.eval_generate",
      "train.objective 'grpo' answers every eval prompt greedily for its "
      "pass@1: set 0",
    )
  dist = sec.get("distributed")
  if dist and dist.enabled:
    bad("distributed.enabled", "train.objective 'grpo' runs in one process")
  if not g:
    return
  if d and d.max_length <= g.max_new_tokens:
    bad(
      "data.max_length",
      f"{d.max_length} leaves no room for a prompt before "
      f"grpo.max_new_tokens={g.max_new_tokens} (a prompt and its completion "
      "fill data.max_length + 1 tokens)",
    )
  if t:
    for field in ("steps", "eval_every", "checkpoint_every"):
      value = getattr(t, field)
      if value > 0 and value % g.mu:
        bad(
          f"train.{field}",
          f"{value} is not a multiple of grpo.mu ({g.mu}): checkpoints and "
          "evaluations fall between generation batches",
        )
  reference = (
    targets["lora_targets"] is not None
    and (lo is None or lo.init in ("kaiming", "gaussian"))
    and not (m and m.adapter)
  )
  if g.beta > 0 and not reference:
    bad(
      "grpo.beta",
      "a KL needs the reference, the model with adapters off as it "
      "starts: adapters that start at zero (lora.enabled, train.mode "
      "'lora', lora.init kaiming or gaussian, no model.adapter); set 0",
    )
