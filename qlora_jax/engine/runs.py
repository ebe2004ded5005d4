"""Exports of a training run: its adapters for PEFT, or its merged model.

A run's workdir holds config.json, labels.json (classification) and
checkpoints/. The base model is rebuilt from the config exactly as training
built it (same plan, same quantization), and the trainable tree is restored
from a checkpoint in its place.
"""

import dataclasses
import json
import pathlib
import re
from typing import Any

import jax.numpy as jnp

from qlora_jax import models
from qlora_jax import nn as qnn
from qlora_jax.engine import setup
from qlora_jax.engine.checkpoint import Checkpoints
from qlora_jax.engine.settings import Settings, recorded
from qlora_jax.interop import gguf_export, hf_export, naming, peft


@dataclasses.dataclass
class Run:
  """A run's model with its trained variables.

  Attributes:
    settings: the run's settings (from its config.json).
    lm: the rebuilt model; `lm.variables` hold the restored trainable tree.
    spec: the model's config and task.
    trainable: the restored trainable tree.
    labels: {label: id} of a classification run, else None.
    base: the base checkpoint folder, or None for a random-init run.
    step: the checkpoint step.
    tokenizer: the base's tokenizer (None without one).
  """

  settings: Settings
  lm: models.Pretrained
  spec: models.ModelSpec
  trainable: dict
  labels: dict[str, int] | None
  base: pathlib.Path | None
  step: int
  tokenizer: Any = None


def _check_same(restored, built, where: str) -> None:
  got = {p: tuple(v.shape) for p, v in qnn.flatten(restored).items()}
  want = {p: tuple(v.shape) for p, v in qnn.flatten(built).items()}
  extra = sorted("/".join(p) for p in set(got) - set(want))
  missing = sorted("/".join(p) for p in set(want) - set(got))
  if extra or missing:
    raise ValueError(
      f"{where}: the checkpoint does not fit the model its config.json "
      f"builds: unexpected {extra[:4]}, missing {missing[:4]}"
    )
  for p, shape in want.items():
    if got[p] != shape:
      raise ValueError(
        f"{where}: variable {'/'.join(p)} is {got[p]} in the checkpoint, "
        f"{shape} in the model"
      )


def read_settings(workdir: str | pathlib.Path) -> Settings:
  """The settings a run's workdir recorded (its config.json)."""
  config_file = pathlib.Path(workdir) / "config.json"
  if not config_file.is_file():
    raise ValueError(f"--workdir: no config.json in {workdir}")
  try:
    return Settings.from_config(recorded(json.loads(config_file.read_text())))
  except ValueError as e:
    raise ValueError(f"{config_file}: {e}") from e


def _base_of(settings: Settings) -> pathlib.Path | None:
  m = settings.model
  return setup.resolve_checkpoint(m.checkpoint) if m.checkpoint else None


def restore(workdir: str | pathlib.Path, step: int | None = None) -> Run:
  """The run's model with the trainable tree of checkpoint `step` (latest
  by default)."""
  workdir = pathlib.Path(workdir)
  settings = read_settings(workdir)
  if not (workdir / "checkpoints").is_dir():
    raise ValueError(f"--workdir: no checkpoints/ in {workdir}")
  checkpoints = Checkpoints(workdir, keep=settings.train.keep_checkpoints)
  step = checkpoints.latest_step() if step is None else step
  if step is None or step not in checkpoints.all_steps():
    raise ValueError(
      f"{checkpoints.directory}: no checkpoint {step} (steps "
      f"{checkpoints.all_steps()})"
    )
  state, meta = checkpoints.read(step)
  checkpoints.close()
  labels = meta.get("label_map")
  opened = setup.open_base(settings.model)
  lm = setup.load_model(settings, opened, len(labels) if labels else None)
  trainable, frozen = setup.split_variables(settings, lm.variables)
  restored = state["params"]
  _check_same(restored, trainable, f"{checkpoints.directory}/{step}")
  restored = qnn.unflatten(
    {p: jnp.asarray(v) for p, v in qnn.flatten(restored).items()}
  )
  lm.variables = qnn.merge_trees(restored, frozen)
  m = settings.model
  spec = models.ModelSpec(lm.config, m.task, len(labels) if labels else None)
  return Run(
    settings, lm, spec, restored, labels, opened.path, step, opened.tokenizer
  )


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
