"""Exports of a finished run: its adapters for PEFT, its merged model as a
Hugging Face folder, or a GGUF file (`restore` rebuilds the run first).
"""

import json
import pathlib
import re
from typing import Any

from qlora_jax import models
from qlora_jax.engine import setup
from qlora_jax.engine.restore import read_settings, restore
from qlora_jax.engine.settings import Settings
from qlora_jax.interop import gguf_export, hf_export, naming, peft


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


def prepare_out(
  out: str | pathlib.Path,
  workdir: pathlib.Path,
  base: pathlib.Path | None,
  overwrite: bool,
) -> pathlib.Path:
  """Checks an export's destination; with `overwrite`, removes the files of
  a previous export there (so no stale shard index survives).

  Raises:
    ValueError: `out` is the run's workdir or the base checkpoint's folder
      (or holds one of them), or is not empty and `overwrite` is False.
  """
  out = pathlib.Path(out).absolute()
  protected = [("the run's workdir", pathlib.Path(workdir).absolute())]
  if base is not None:
    protected.append(("the base checkpoint's folder", base.absolute()))
  for what, folder in protected:
    if out.resolve() == folder.resolve() or folder.resolve().is_relative_to(
      out.resolve()
    ):
      raise ValueError(f"--out {out}: refusing to write into {what} {folder}")
  if out.exists() and not out.is_dir():
    raise ValueError(f"--out {out}: exists and is not a folder")
  present = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
  if present and not overwrite:
    raise ValueError(
      f"--out {out}: not empty ({', '.join(present[:5])}"
      f"{'...' if len(present) > 5 else ''}); pass --overwrite to replace a "
      "previous export"
    )
  if present:
    for p in out.iterdir():
      if p.is_file() and (
        p.name in EXPORT_FILES or re.fullmatch(r"model-.*\.safetensors", p.name)
      ):
        p.unlink()
  return out


def export_adapter(
  workdir: str | pathlib.Path,
  out: str | pathlib.Path,
  step: int | None = None,
  overwrite: bool = False,
) -> dict[str, Any]:
  """Writes the run's adapters as a PEFT LoRA adapter; returns its config."""
  base = _base_of(read_settings(workdir))
  out = prepare_out(out, pathlib.Path(workdir), base, overwrite)
  run = restore(workdir, step)
  if run.settings.train.mode == "full":
    raise ValueError(
      "train.mode 'full' trains every weight: there is no adapter to "
      "export; export the merged model (--merged)"
    )
  base = str(run.base.resolve()) if run.base else ""
  return peft.write_adapter(
    out,
    run.trainable,
    run.lm.plan,
    run.spec,
    run.settings.model.scan_layers,
    base,
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
  base = _base_of(read_settings(workdir))
  out = prepare_out(out, pathlib.Path(workdir), base, overwrite)
  run = restore(workdir, step)
  merged, _ = hf_export.merge(run.lm.variables, run.lm.plan, requantize)
  if run.base is not None and models.is_gguf(run.base):
    raw = models.gguf_config(run.base)
  elif run.base is not None:
    raw = json.loads((run.base / "config.json").read_text())
  else:
    raw = dict(run.settings.model.hf_config)
  return hf_export.write_merged(
    out,
    merged,
    run.spec,
    run.settings.model.scan_layers,
    base=run.base,
    raw_config=raw,
    dtype=dtype,
    labels=run.labels,
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
    ValueError: the run's base is not a GGUF file, `out` exists (without
      `overwrite`) or is the base file, or as `interop.write_gguf`.
  """
  base = _base_of(read_settings(workdir))
  if base is None or not models.is_gguf(base):
    raise ValueError(
      f"--gguf: the run's base checkpoint is {base or 'a random init'}: a "
      "GGUF export copies its metadata and tokenizer from a GGUF base "
      "(model.checkpoint = FILE.gguf or smollm2); export a Hugging Face "
      "folder with --merged --out DIR instead"
    )
  out = pathlib.Path(out).absolute()
  if out.suffix != ".gguf":
    raise ValueError(f"--gguf {out}: the file name must end in .gguf")
  if out.exists() and out.resolve() == base.resolve():
    raise ValueError(f"--gguf {out}: refusing to overwrite the base checkpoint")
  if out.exists() and (out.is_dir() or not overwrite):
    raise ValueError(
      f"--gguf {out}: exists; pass --overwrite to replace a previous export"
    )
  if dtype not in gguf_export.TYPES:
    raise ValueError(
      f"--dtype: {dtype!r}, expected one of {list(gguf_export.TYPES)}"
    )
  out.parent.mkdir(parents=True, exist_ok=True)
  run = restore(workdir, step)
  # QA-LoRA merges exactly into its base's block minimums (codes kept, and
  # written as Q4_1 for int4_asym in blocks of 32); others merge in float.
  exact = run.settings.lora_plan() is not None and run.settings.lora.qa
  merged, _ = hf_export.merge(run.lm.variables, run.lm.plan, exact)
  names = naming.Names(run.spec, run.settings.model.scan_layers)
  tensors, _, _ = hf_export.merged_tensors(merged, names, "float32", False)
  return gguf_export.write_gguf(out, tensors, base, dtype)
