"""A llama.cpp GGUF file as a Hugging Face folder (experiments.convert).

The folder holds config.json (from the GGUF metadata), the tensors in the
Hugging Face layout (q/k rows un-permuted, dequantized to float32 and cast
to `dtype`) as model.safetensors or ~2 GB shards with an index,
tokenizer.json and tokenizer_config.json (with the chat template and the
special tokens): the same model for transformers / PEFT users and for the
safetensors path of `models.from_pretrained`. The file's tensor set and
shapes are checked against its metadata first, as loading it for training
does (`models.loading.match`); then tensors are converted one at a time,
a shard written when it is full. Writing the folder whole or not at all
is the caller's (`engine.export.convert_gguf`).
"""

import json
import pathlib

import numpy as np
import safetensors.numpy

from qlora_jax import models
from qlora_jax.interop.naming import FILE_DTYPES
from qlora_jax.models import loading

SHARD_BYTES = 2 * 10**9
FOLDER_DTYPES = tuple(FILE_DTYPES)  # a converted folder's tensors


def write_tokenizer(gguf: str | pathlib.Path, out: pathlib.Path) -> None:
  """tokenizer.json and tokenizer_config.json of a GGUF file's tokenizer."""
  g = models.gguf_tokenizer(gguf)
  g.tokenizer.save(str(out / "tokenizer.json"))
  config = {
    "tokenizer_class": "PreTrainedTokenizerFast",
    "clean_up_tokenization_spaces": False,
    **g.special_tokens,
  }
  if g.chat_template is not None:
    config["chat_template"] = g.chat_template
  (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
  (out / "special_tokens_map.json").write_text(
    json.dumps(g.special_tokens, indent=2)
  )


def convert(
  gguf: str | pathlib.Path, out: str | pathlib.Path, dtype: str = "float32"
) -> pathlib.Path:
  """Writes the Hugging Face folder `out` (new or empty) from the GGUF file
  `gguf`.

  Raises:
    CheckpointError: as `models.GGUFCheckpoint`, or a tensor missing or
      unexpected for the metadata (naming file and tensor).
    ValueError: an unknown `dtype`, or `out` not empty.
  """
  if dtype not in FOLDER_DTYPES:
    raise ValueError(
      f"--dtype: {dtype!r}, expected one of {list(FOLDER_DTYPES)}"
    )
  out = pathlib.Path(out)
  if out.exists() and (not out.is_dir() or any(out.iterdir())):
    raise ValueError(f"--out {out}: exists and is not an empty folder")
  ckpt = models.GGUFCheckpoint(gguf)
  config = dict(ckpt.config, torch_dtype=dtype)
  spec = models.ModelSpec(models.from_dict(config, str(gguf)), "causal_lm")
  wanted = loading.targets(spec, scan_layers=False)
  loading.match(ckpt, spec.layout, wanted, str(gguf))  # as training does
  out.mkdir(parents=True, exist_ok=True)
  current: dict[str, np.ndarray] = {}
  written: list[tuple[str, list[str]]] = []  # (file, its tensors)

  def flush():
    name = f"model-{len(written) + 1:05d}.safetensors"
    safetensors.numpy.save_file(
      current, str(out / name), metadata={"format": "pt"}
    )
    written.append((name, list(current)))
    current.clear()

  size = 0
  for key in ckpt.keys():
    array = ckpt.read(key).astype(FILE_DTYPES[dtype])
    if current and size + array.nbytes > SHARD_BYTES:
      flush()
      size = 0
    current[key] = array
    size += array.nbytes
    del array
  if not written:  # it fits one file: model.safetensors
    safetensors.numpy.save_file(
      current, str(out / "model.safetensors"), metadata={"format": "pt"}
    )
  else:
    flush()
    weight_map = {}
    for i, (old, keys) in enumerate(written, 1):
      new = f"model-{i:05d}-of-{len(written):05d}.safetensors"
      (out / old).rename(out / new)
      weight_map.update(dict.fromkeys(keys, new))
    (out / "model.safetensors.index.json").write_text(
      json.dumps({"metadata": {}, "weight_map": weight_map}, indent=2)
    )
  (out / "config.json").write_text(json.dumps(config, indent=2))
  write_tokenizer(gguf, out)
  return out
