"""Exports of a finished run: its adapters for PEFT or as a llama.cpp LoRA
GGUF file, its merged model as a Hugging Face folder or a GGUF file
(`restore` rebuilds the run first); and a GGUF file converted to a Hugging
Face folder.

Each is written through `outputs.writing`: whole or not at all, never over
or into the run's workdir, the base checkpoint or the converted file, an
existing output replaced only with `overwrite`.
"""

import json
import pathlib
import re
from typing import Any

from qlora_jax import models
from qlora_jax.data import chat_templates
from qlora_jax.engine import outputs, setup
from qlora_jax.engine.restore import read_settings, restore
from qlora_jax.engine.settings import Settings
from qlora_jax.interop import (
  chat_template,
  gguf_convert,
  gguf_export,
  gguf_lora,
  hf_export,
  naming,
  peft,
)


def _base_of(settings: Settings) -> pathlib.Path | None:
  m = settings.model
  return setup.resolve_checkpoint(m.checkpoint) if m.checkpoint else None


# Files an export writes (a sharded merge writes model-*.safetensors too).
EXPORT_FILES = (
  "adapter_config.json",
  "adapter_model.safetensors",
  "config.json",
  "model.safetensors",
  "model.safetensors.index.json",
  "tokenizer.json",
  "tokenizer_config.json",
  "special_tokens_map.json",
  "generation_config.json",
  "labels.json",
)


def is_export_file(name: str) -> bool:
  """Whether an export or a conversion writes a file of this name."""
  return name in EXPORT_FILES or bool(
    re.fullmatch(r"model-.*\.safetensors", name)
  )


def _run_template(run) -> chat_template.RunTemplate | None:
  """The template the run named (data.chat_template), which its exports
  carry in place of the base's; None when it kept the base's."""
  if run.settings.data.chat_template == chat_templates.OWN:
    return None
  tok = run.tokenizer
  return chat_template.RunTemplate(tok.chat_template, tok.end_of_turn_id)


def _writing(out, workdir, settings: Settings, overwrite: bool, **kw):
  """`outputs.writing`, kept off the run's workdir and base checkpoint."""
  keep_off = [
    ("the run's workdir", workdir),
    ("the base checkpoint", _base_of(settings)),
  ]
  return outputs.writing(
    out,
    overwrite=overwrite,
    keep_off=keep_off,
    replaces=is_export_file,
    **kw,
  )


def export_adapter(
  workdir: str | pathlib.Path,
  out: str | pathlib.Path,
  step: int | None = None,
  overwrite: bool = False,
) -> dict[str, Any]:
  """Writes the run's adapters as a PEFT LoRA adapter; returns its config."""
  settings = read_settings(workdir)
  if settings.train.mode == "full":
    raise ValueError(
      "train.mode 'full' trains every weight: there is no adapter to "
      "export; export the merged model (--merged)"
    )
  with _writing(out, workdir, settings, overwrite, folder=True) as tmp:
    run = restore(workdir, step)
    return peft.write_adapter(
      tmp,
      run.trainable,
      run.lm.plan,
      run.spec,
      run.settings.model.scan_layers,
      str(run.base.resolve()) if run.base else "",
    )


def export_merged(
  workdir: str | pathlib.Path,
  out: str | pathlib.Path,
  dtype: str = "float32",
  requantize: bool = False,
  step: int | None = None,
  overwrite: bool = False,
) -> pathlib.Path:
  """Writes the run's merged model as a Hugging Face folder."""
  settings = read_settings(workdir)
  with _writing(out, workdir, settings, overwrite, folder=True) as tmp:
    run = restore(workdir, step)
    merged, _ = hf_export.merge(run.lm.variables, run.lm.plan, requantize)
    if run.base is not None and models.is_gguf(run.base):
      raw = models.gguf_config(run.base)
    elif run.base is not None:
      raw = json.loads((run.base / "config.json").read_text())
    else:
      raw = dict(run.settings.model.hf_config)
    hf_export.write_merged(
      tmp,
      merged,
      run.spec,
      run.settings.model.scan_layers,
      base=run.base,
      raw_config=raw,
      dtype=dtype,
      labels=run.labels,
      template=_run_template(run),
    )
  return pathlib.Path(out)


def _gguf_base(settings: Settings, out, flag: str) -> pathlib.Path:
  """The run's GGUF base file; raises unless there is one and `out` ends
  in .gguf."""
  base = _base_of(settings)
  if base is None or not models.is_gguf(base):
    raise ValueError(
      f"{flag}: the run's base checkpoint is {base or 'a random init'}: a "
      "GGUF export copies its metadata and tokenizer from a GGUF base "
      "(model.checkpoint = FILE.gguf or smollm2); export a Hugging Face "
      "folder with --merged --out DIR instead"
    )
  if pathlib.Path(out).suffix != ".gguf":
    raise ValueError(f"{flag} {out}: the file name must end in .gguf")
  return base


def export_gguf_lora(
  workdir: str | pathlib.Path,
  out: str | pathlib.Path,
  dtype: str = "float32",
  step: int | None = None,
  overwrite: bool = False,
) -> dict[str, Any]:
  """Writes the run's adapters as a llama.cpp LoRA GGUF file (`out`) that
  llama.cpp applies over the run's base GGUF file; returns {"alpha",
  "tensors", "types"} (`interop.gguf_lora`).

  Raises:
    ValueError: the run's base is not a GGUF file, it trains every weight,
      `out` is refused (as `outputs.check`), or an adapter llama.cpp cannot
      apply (DoRA, trained norms or heads, PiSSA / LoftQ).
  """
  settings = read_settings(workdir)
  if settings.train.mode == "full":
    raise ValueError(
      "train.mode 'full' trains every weight: there is no adapter to "
      "export; export the merged model (--gguf)"
    )
  base = _gguf_base(settings, out, "--gguf_lora")
  if dtype not in gguf_export.TYPES:
    raise ValueError(
      f"--dtype: {dtype!r}, expected one of {list(gguf_export.TYPES)}"
    )
  with _writing(
    out, workdir, settings, overwrite, folder=False, flag="--gguf_lora"
  ) as tmp:
    run = restore(workdir, step)
    return gguf_lora.write_gguf_lora(
      tmp,
      run.trainable,
      run.lm.plan,
      run.spec,
      run.settings.model.scan_layers,
      base,
      dtype,
    )


def export_gguf(
  workdir: str | pathlib.Path,
  out: str | pathlib.Path,
  dtype: str = "float32",
  step: int | None = None,
  overwrite: bool = False,
) -> pathlib.Path:
  """Writes the run's merged model as one GGUF file (`out`), with the base
  GGUF file's metadata, tokenizer and chat template. A QA-LoRA run is
  merged exactly (see `qlora_jax.nn.merge`); over int4_asym in blocks of
  32 its matrices are written as Q4_1 with their codes untouched.

  Raises:
    ValueError: the run's base is not a GGUF file, `out` is refused (as
      `outputs.check`), or as `interop.write_gguf`.
  """
  settings = read_settings(workdir)
  base = _gguf_base(settings, out, "--gguf")
  if dtype not in gguf_export.TYPES:
    raise ValueError(
      f"--dtype: {dtype!r}, expected one of {list(gguf_export.TYPES)}"
    )
  with _writing(
    out, workdir, settings, overwrite, folder=False, flag="--gguf"
  ) as tmp:
    run = restore(workdir, step)
    # QA-LoRA merges exactly into its base's block minimums (codes kept,
    # and written as Q4_1 for int4_asym in blocks of 32); others in float.
    exact = run.settings.lora_plan() is not None and run.settings.lora.qa
    merged, _ = hf_export.merge(run.lm.variables, run.lm.plan, exact)
    names = naming.Names(run.spec, run.settings.model.scan_layers)
    tensors, _, _ = hf_export.merged_tensors(merged, names, "float32", False)
    gguf_export.write_gguf(tmp, tensors, base, dtype, _run_template(run))
  return pathlib.Path(out)


def convert_gguf(
  gguf: str | pathlib.Path,
  out: str | pathlib.Path,
  dtype: str = "float32",
  overwrite: bool = False,
) -> pathlib.Path:
  """Writes a GGUF file (or a named one, "smollm2") as a Hugging Face
  folder (`interop.gguf_convert`), whole or not at all."""
  path = setup.resolve_checkpoint(str(gguf))
  if not models.is_gguf(path):
    raise ValueError(f"--gguf {gguf}: not a .gguf file")
  with outputs.writing(
    out,
    folder=True,
    overwrite=overwrite,
    keep_off=[("the --gguf file", path)],
    replaces=is_export_file,
  ) as tmp:
    gguf_convert.convert(path, tmp, dtype)
  return pathlib.Path(out)
