"""Merged models out to Hugging Face folders.

`merge` folds every adapter into the dequantized base it was trained on
(`qlora_jax.nn.merge_adapters`). `write_merged` writes the result as a
folder transformers loads: config.json (the base's, with `dtype` set),
model.safetensors with HF names and layouts (GPT-2's Conv1D weights [in,
out], a flax head's kernel as weight [out, in]), and the base's tokenizer
files. With re-quantization the adapted weights are quantized again with
their layer's spec and stored as codes and scales (the format of
`qlora_jax.models.prequantized`), which `models.from_pretrained` reads back
without a float copy; transformers cannot load that folder.
"""

import dataclasses
import json
import pathlib
import shutil
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import safetensors.numpy
from absl import logging

from qlora_jax import models, quant
from qlora_jax import nn as qnn
from qlora_jax.interop import gguf_convert
from qlora_jax.interop.chat_template import RunTemplate, write_to_folder
from qlora_jax.interop.naming import FILE_DTYPES, Names, head_tensor
from qlora_jax.models import prequantized
from qlora_jax.models.safetensors_reader import SINGLE, Checkpoint

MERGED_DTYPES = ("float32", "bfloat16")  # a merged folder's float tensors
TOKENIZER_FILES = (
  "tokenizer.json",
  "tokenizer_config.json",
  "special_tokens_map.json",
  "added_tokens.json",
  "tokenizer.model",
  "vocab.txt",
  "vocab.json",
  "merges.txt",
  "generation_config.json",
  "chat_template.jinja",
)
_ARCHITECTURES = {"classification": "BertForSequenceClassification"}


def _stacked(fn, depth: int):
  for _ in range(depth):
    fn = jax.vmap(fn)
  return fn


def merge(
  variables: Mapping[str, Any],
  plan: qnn.Plan,
  requantize: bool = False,
) -> tuple[dict, qnn.Plan]:
  """(merged variables, the plan of the merged model).

  Float merge: every adapter folded in (float32) and every other quantized
  weight dequantized, so no leaf is quantized. Re-quantized: adapted
  quantized layers are quantized again (from float32) and the others keep
  their codes; the plan keeps the quantization specs only.
  """
  merged = qnn.merge_adapters(variables, plan, jnp.float32, requantize)
  if requantize:
    layers = tuple(
      (p, qnn.LayerSpec(None, s.quant)) for p, s in plan.layers if s.quant
    )
    return merged, qnn.Plan(layers)
  flat = qnn.flatten(merged)
  for path, leaf in flat.items():
    if isinstance(leaf, quant.QuantizedTensor):
      fn = _stacked(
        lambda q: quant.dequantize(q, jnp.float32), leaf.codes.ndim - 1
      )
      flat[path] = fn(leaf)
  return qnn.unflatten(flat), qnn.Plan()


def merged_model(model, plan: qnn.Plan):
  """`model` (a built model with `opts`) rebuilt with the merged plan."""
  return model.clone(opts=dataclasses.replace(model.opts, plan=plan))


def _index(leaf, layer: int | None):
  if layer is None:
    return leaf
  return jax.tree.map(lambda a: a[layer], leaf)


def merged_tensors(
  merged: Mapping[str, Any], names: Names, dtype: str, parts: bool = True
) -> tuple[dict[str, Any], dict[str, tuple[int, ...]], set]:
  """(HF tensors, {name: shape} of quantized weights, their specs).

  A quantized weight is written as its parts (`name.codes`, ...), or with
  `parts=False` as the QuantizedTensor itself under its name.
  """
  out: dict[str, np.ndarray] = {}
  shapes: dict[str, tuple[int, ...]] = {}
  specs = set()
  for path, leaf in qnn.flatten(merged).items():
    layers = names.layers(path) if path[0] == qnn.BASE else [None]
    for layer in layers:
      t = (
        names.tensor(path, layer) if path[0] == qnn.BASE else head_tensor(path)
      )
      value = _index(leaf, layer)
      if isinstance(value, quant.QuantizedTensor):
        shapes[t.name] = tuple(value.shape)
        specs.add(value.spec)
        if not parts:
          out[t.name] = value
          continue
        for part in prequantized.PARTS:
          array = getattr(value, part)
          if array is not None:
            out[f"{t.name}.{part}"] = np.asarray(array)
        continue
      array = np.asarray(value, np.float32)
      array = array.T if t.transposed else array
      out[t.name] = np.ascontiguousarray(array.astype(FILE_DTYPES[dtype]))
  return out, shapes, specs


def _hf_config(raw: Mapping[str, Any], dtype: str, task: str, labels) -> dict:
  config = dict(raw)
  config["dtype"] = dtype
  if "torch_dtype" in config:
    config["torch_dtype"] = dtype
  config.pop(prequantized.SECTION, None)
  if task in _ARCHITECTURES:
    config["architectures"] = [_ARCHITECTURES[task]]
  if labels:
    ids = sorted(labels.items(), key=lambda kv: kv[1])
    config["id2label"] = {str(i): name for name, i in ids}
    config["label2id"] = {name: i for name, i in ids}
  return config


def _unused_base_tensors(base: pathlib.Path, names: Names, dtype: str):
  """Float tensors of the base that the model does not compute but the HF
  model has (BERT's pooler), under the HF model's names."""
  unused = set(names.unused_linears())
  if not unused:
    return {}
  ckpt = Checkpoint(base)
  out = {}
  for key in ckpt.keys():
    name = names.layout.canonical(key)
    if name.rsplit(".", 1)[0] in unused:
      out[name] = ckpt.read(key).astype(FILE_DTYPES[dtype])
  return out


def write_merged(
  out: str | pathlib.Path,
  merged: Mapping[str, Any],
  spec: models.ModelSpec,
  scan_layers: bool,
  *,
  base: str | pathlib.Path | None,
  raw_config: Mapping[str, Any],
  dtype: str = "float32",
  labels: Mapping[str, int] | None = None,
  template: RunTemplate | None = None,
) -> pathlib.Path:
  """Writes a merged model (the output of `merge`) as an HF folder.

  Args:
    out: the folder to write (created).
    merged: merged variables; quantized leaves are written as codes and
      scales with a quantization section in config.json.
    spec: the model's config and task.
    scan_layers: whether the variables are stacked per block.
    base: the base checkpoint folder (tokenizer files and tensors the model
      does not compute are copied from it), or None.
    raw_config: the base's config.json contents.
    dtype: "float32" or "bfloat16", for float tensors.
    labels: {label: id} of a classifier (id2label / label2id).
    template: the run's chat template, in place of the base's.
  """
  if dtype not in MERGED_DTYPES:
    raise ValueError(f"dtype: {dtype!r} is not one of {list(MERGED_DTYPES)}")
  names = Names(spec, scan_layers)
  tensors, shapes, specs = merged_tensors(merged, names, dtype)
  config = _hf_config(raw_config, dtype, spec.task, labels)
  if shapes:
    if len(specs) != 1:
      raise ValueError(f"quantized weights of several specs {specs}")
    config[prequantized.SECTION] = prequantized.section_dict(
      specs.pop(), shapes
    )
  out = pathlib.Path(out)
  out.mkdir(parents=True, exist_ok=True)
  if base is not None and models.is_gguf(base):
    gguf_convert.write_tokenizer(base, out)
  elif base is not None:
    base = pathlib.Path(base)
    if not shapes:
      for k, v in _unused_base_tensors(base, names, dtype).items():
        tensors.setdefault(k, v)
    for name in TOKENIZER_FILES:
      if (base / name).is_file():
        shutil.copyfile(base / name, out / name)
  if template is not None:
    write_to_folder(out, template)
  safetensors.numpy.save_file(
    tensors, str(out / SINGLE), metadata={"format": "pt"}
  )
  (out / "config.json").write_text(json.dumps(config, indent=2))
  logging.debug(
    "wrote %d tensors (%d quantized weights) to %s",
    len(tensors),
    len(shapes),
    out,
  )
  return out
