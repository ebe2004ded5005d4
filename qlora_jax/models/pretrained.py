"""Models from Hugging Face checkpoint folders (or random), ready to train.

lm = from_pretrained("path/to/llama", lora={"rank": 16},
                     quant={"data_type": "nf4", "double_quant": True})
logits = lm.model.apply(lm.variables, input_ids)
"""

import dataclasses
import pathlib
import resource
import time
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import tokenizers
from absl import logging

from qlora_jax import nn as qnn
from qlora_jax.models import gguf_reader, loading, prequantized
from qlora_jax.models.config import Config, from_dict, read_config
from qlora_jax.models.gguf_tokenizer import gguf_tokenizer
from qlora_jax.models.layers import Options
from qlora_jax.models.registry import ModelSpec
from qlora_jax.models.safetensors_reader import Checkpoint, CheckpointError

MiB = 1 << 20


@dataclasses.dataclass
class Pretrained:
  """A model with its variables ({"base": frozen, "params": trainable})."""

  model: nn.Module
  variables: dict
  plan: qnn.Plan
  config: Config
  tokenizer: tokenizers.Tokenizer | None = None
  stats: loading.LoadStats | None = None


def model_plan(
  spec: ModelSpec,
  lora: qnn.LoraTargets | Mapping[str, Any] | None,
  quant: qnn.QuantTargets | Mapping[str, Any] | None,
  scan_layers: bool,
) -> qnn.Plan:
  """`qlora_jax.nn.make_plan` over the model's linear layers.

  Linear layers are the modules owning a frozen `weight`; with
  `scan_layers` their paths are those of the scanned blocks
  ("model/layers/self_attn/q_proj").
  """
  shapes = spec.abstract_variables(Options(scan_layers=scan_layers))
  paths = [
    "/".join(p[1:-1])
    for p in qnn.flatten(shapes)
    if p[0] == qnn.BASE and p[-1] == "weight"
  ]
  return qnn.make_plan(paths, lora, quant, heads=spec.heads)


def _peak_rss() -> int:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


@dataclasses.dataclass(frozen=True)
class ModelOptions:
  """How `from_pretrained` and `init_random` build a model.

  Attributes:
    task: "causal_lm" (Llama, Mistral, Qwen2, GPT-2), "embedding" (BERT:
      normalised masked-mean sentence embeddings) or "classification"
      (BERT with a new trainable classifier of `num_labels` outputs).
    num_labels: outputs of a new classification head.
    lora: adapters, an `nn.LoraTargets` (a mapping is parsed into one:
      `{"rank": 16}`; None: none).
    quant: quantization of frozen linear weights, an `nn.QuantTargets` (a
      mapping is parsed: `{"data_type": "nf4"}`; None or data type "none":
      float weights in `base_dtype`).
    dtype: compute dtype.
    base_dtype: storage dtype of frozen float weights (and the dtype the
      quantizer sees).
    embed_dtype: storage dtype of the embedding tables (None:
      `base_dtype`; see `Options.embed_dtype`).
    scan_layers: stack the blocks' variables and scan over them.
    remat: gradient checkpointing per block.
    seed: seeds the adapters' and new heads' initialisation.
    place: `place(path, leaf) -> leaf`, called once per variable as soon
      as it is complete (path "base/model/embed_tokens/embedding"), e.g.
      to put it on a device mesh; default: the default device.
    matmul_kernel: "auto", "xla", "pallas" or "cpu", the matmul of quantized
      linear layers (`Options.matmul_kernel`).
  """

  task: str = "causal_lm"
  num_labels: int | None = None
  lora: qnn.LoraTargets | None = None
  quant: qnn.QuantTargets | None = None
  dtype: Any = jnp.float32
  base_dtype: Any = jnp.float32
  scan_layers: bool = False
  remat: bool = False
  seed: int = 0
  place: loading.Place | None = None
  matmul_kernel: str = "auto"
  embed_dtype: Any = None

  def __post_init__(self):
    object.__setattr__(self, "lora", qnn.LoraTargets.parse(self.lora))
    object.__setattr__(self, "quant", qnn.QuantTargets.parse(self.quant))


def model_options(
  options: ModelOptions | None = None, **fields: Any
) -> ModelOptions:
  """`options` (default: `ModelOptions()`) with `fields` replaced."""
  options = options or ModelOptions()
  known = {f.name for f in dataclasses.fields(ModelOptions)}
  unknown = sorted(set(fields) - known)
  if unknown:
    raise TypeError(
      f"unknown model option(s) {unknown}: expected {sorted(known)}"
    )
  return dataclasses.replace(options, **fields)


def from_pretrained(
  path: str | pathlib.Path,
  options: ModelOptions | None = None,
  *,
  config: Config | None = None,
  with_tokenizer: bool = True,
  **fields: Any,
) -> Pretrained:
  """Loads a Hugging Face checkpoint folder, quantizing as it reads.

  Args:
    path: folder with config.json, model.safetensors (or a sharded
      model.safetensors.index.json) and optionally tokenizer.json; or a
      llama.cpp `.gguf` file (architectures llama, qwen2, qwen3, gemma3
      and phi3; every tensor type the `gguf` package dequantizes), whose
      config and tokenizer come from its metadata.
    options: how to build the model (`ModelOptions`); keyword `fields`
      replace single options (`lora=..., quant=...`).
    config: the checkpoint's config, when the caller has parsed it already
      (`checkpoint_config(path)`); read from `path` otherwise.
    with_tokenizer: load the checkpoint's tokenizer into
      `Pretrained.tokenizer` (a caller holding it already passes False).

  Raises:
    ConfigError, CheckpointError (ValueErrors naming file and tensor): an
      unsupported model, a missing / unexpected / misshapen / non-finite
      tensor.
  """
  o = model_options(options, **fields)
  start, rss_before = time.perf_counter(), _peak_rss()
  folder = pathlib.Path(path)
  tokenizer = None
  if is_gguf(folder):  # a llama.cpp file
    gguf = gguf_reader.read_gguf(folder)
    ckpt = gguf_reader.GGUFCheckpoint(gguf)
    config_file, section = folder, None
    config = config or from_dict(ckpt.config, str(folder))
    if with_tokenizer:
      tokenizer = gguf_tokenizer(gguf).tokenizer
  else:
    config_file = folder / "config.json"
    config = config or read_config(config_file)
    ckpt = Checkpoint(folder)
    section = prequantized.read_section(config_file)
    if with_tokenizer:
      tokenizer = _tokenizer(folder)
  quant = o.quant
  if section is not None:  # linear weights stored quantized
    if quant:
      raise ValueError(
        f"quant: {config_file} holds quantized weights ({section.spec}); "
        "pass quant=None"
      )
    spec = ModelSpec(config, o.task, o.num_labels)
    targets = loading.targets(spec, o.scan_layers)
    quant = prequantized.quant_targets(section, targets, spec.layout)
    ckpt = prequantized.QuantizedCheckpoint(ckpt, section, spec.layout)
  o = dataclasses.replace(o, quant=quant)
  lm = _read(ckpt, config, o, str(config_file), tokenizer, rss_before)
  lm.stats.seconds = time.perf_counter() - start
  logging.debug("loaded %s: %s", folder, lm.stats)
  return lm


def from_checkpoint(
  ckpt: Any,
  config: Config | Mapping[str, Any],
  options: ModelOptions | None = None,
  *,
  source: str = "the checkpoint",
  **fields: Any,
) -> Pretrained:
  """The model of `config` with its frozen tensors read from `ckpt`.

  `ckpt` is any object with the interface `loading.read_variables` reads
  (`keys()`, `shape(key)`, `file(key)`, `read(key)`, `where`, `folder`;
  optionally `read_unchecked`, `what`, `prefetch`), e.g. tensors generated
  on demand, so that a model too large for the disk can still be built
  tensor by tensor. `source` names the config in error messages. Options
  as in `from_pretrained`.
  """
  start, rss_before = time.perf_counter(), _peak_rss()
  o = model_options(options, **fields)
  if isinstance(config, Mapping):
    config = from_dict(config, source)
  lm = _read(ckpt, config, o, source, None, rss_before)
  lm.stats.seconds = time.perf_counter() - start
  return lm


def _read(ckpt, config, o: ModelOptions, source, tokenizer, rss_before):
  spec = ModelSpec(config, o.task, o.num_labels)
  opts = layer_options(spec, o)
  plan = opts.plan
  model = spec.build(opts)
  flat, stats = loading.read_variables(
    ckpt, spec, opts, source, o.seed, o.place
  )
  variables = _complete(model, spec, opts, flat, o.seed, o.place)
  stats.peak_rss_bytes, stats.peak_rss_before_bytes = _peak_rss(), rss_before
  return Pretrained(model, variables, plan, config, tokenizer, stats)


def init_random(
  config: Config | Mapping[str, Any],
  options: ModelOptions | None = None,
  **fields: Any,
) -> Pretrained:
  """A randomly initialised model of the same classes as `from_pretrained`.

  `config` is a parsed config or the contents of a config.json (a dict
  with `model_type`, ...). Weights are N(0, 0.02), norms 1. Options as in
  `from_pretrained`.
  """
  o = model_options(options, **fields)
  if isinstance(config, Mapping):
    config = from_dict(config)
  spec = ModelSpec(config, o.task, o.num_labels)
  opts = layer_options(spec, o)
  plan = opts.plan
  model = spec.build(opts)
  rngs = {"params": jax.random.key(o.seed)}
  variables = jax.jit(model.init)(rngs, *spec.dummy_inputs())
  place = o.place or loading.default_place
  flat = {p: place("/".join(p), v) for p, v in qnn.flatten(variables).items()}
  return Pretrained(model, qnn.unflatten(flat), plan, config)


def is_gguf(path: str | pathlib.Path) -> bool:
  """Whether `path` is a GGUF file (else a Hugging Face folder)."""
  path = pathlib.Path(path)
  return path.suffix == ".gguf" and path.is_file()


def checkpoint_config(path: str | pathlib.Path) -> Config:
  """The model config of a Hugging Face folder or a GGUF file."""
  if is_gguf(path):
    return from_dict(gguf_reader.gguf_config(path), str(path))
  return read_config(pathlib.Path(path) / "config.json")


def layer_options(spec: ModelSpec, o: ModelOptions) -> Options:
  """The layers' `Options` that `o` gives for `spec`: its plan resolved
  over the model's linear layers (the one ModelOptions -> Options
  conversion, shared by loading, random init and abstract steps)."""
  plan = model_plan(spec, o.lora, o.quant, o.scan_layers)
  return Options(
    plan,
    o.dtype,
    o.base_dtype,
    o.remat,
    o.scan_layers,
    o.matmul_kernel,
    o.embed_dtype,
  )


def _new_variables(model, spec, flat, key) -> dict:
  """The variables `flat` lacks, from the model's own initialisers.

  One jitted apply that returns only those: XLA drops the rest of the
  forward pass, so this compiles a few initialisers instead of running the
  whole model op by op (13 s for MiniLM's classification head)."""
  have = set(flat)

  def init(variables, key):
    _, new = model.apply(
      variables,
      *spec.dummy_inputs(),
      rngs={"params": key},
      mutable=[qnn.PARAMS],
    )
    return {p: v for p, v in qnn.flatten(new).items() if p not in have}

  return jax.jit(init)(qnn.unflatten(flat), key)


def _complete(model, spec, opts, flat, seed, place) -> dict:
  """Initialises variables the checkpoint lacks (new heads); checks all."""
  expected = qnn.flatten(spec.abstract_variables(opts))
  lost = [p for p in expected if p[0] == qnn.BASE and p not in flat]
  if lost:  # targets() and the built model disagree: a bug, not bad input
    raise RuntimeError(f"loader produced no value for {lost[:5]}")
  if any(p not in flat for p in expected):
    place = place or loading.default_place
    key = jax.random.fold_in(jax.random.key(seed), 1 << 30)
    for p, value in _new_variables(model, spec, flat, key).items():
      flat[p] = place("/".join(p), value)
  for p, want in expected.items():
    got = jax.tree.map(lambda a: (a.shape, a.dtype), flat.get(p))
    want = jax.tree.map(lambda a: (a.shape, a.dtype), want)
    if got != want:
      raise RuntimeError(
        f"variable {'/'.join(p)}: loaded {got}, expected {want}"
      )
  return qnn.unflatten(flat)


def _tokenizer(folder: pathlib.Path) -> tokenizers.Tokenizer | None:
  path = folder / "tokenizer.json"
  if not path.is_file():
    return None
  try:
    return tokenizers.Tokenizer.from_file(str(path))
  except Exception as e:  # tokenizers raises a bare Exception
    raise CheckpointError(f"{path}: cannot load tokenizer: {e}") from e
