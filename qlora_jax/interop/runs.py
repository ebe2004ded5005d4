"""Exports of a training run: its adapters for PEFT, or its merged model.

A run's workdir holds config.json, labels.json (classification) and
checkpoints/. The base model is rebuilt from the config exactly as training
built it (same plan, same quantization), and the trainable tree is restored
from a checkpoint in its place.
"""

import dataclasses
import json
import pathlib
from typing import Any

import jax.numpy as jnp
import ml_collections

from qlora_jax import build, models
from qlora_jax import nn as qnn
from qlora_jax.checkpoint import Checkpoints
from qlora_jax.interop import hf_export, peft


@dataclasses.dataclass
class Run:
  """A run's model with its trained variables.

  Attributes:
    config: the run's config.
    lm: the rebuilt model; `lm.variables` hold the restored trainable tree.
    spec: the model's config and task.
    trainable: the restored trainable tree.
    labels: {label: id} of a classification run, else None.
    base: the base checkpoint folder, or None for a random-init run.
    step: the checkpoint step.
  """

  config: ml_collections.ConfigDict
  lm: models.Pretrained
  spec: models.ModelSpec
  trainable: dict
  labels: dict[str, int] | None
  base: pathlib.Path | None
  step: int


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


def restore(workdir: str | pathlib.Path, step: int | None = None) -> Run:
  """The run's model with the trainable tree of checkpoint `step` (latest
  by default)."""
  workdir = pathlib.Path(workdir)
  config_file = workdir / "config.json"
  if not config_file.is_file():
    raise ValueError(f"--workdir: no config.json in {workdir}")
  config = ml_collections.ConfigDict(json.loads(config_file.read_text()))
  if not (workdir / "checkpoints").is_dir():
    raise ValueError(f"--workdir: no checkpoints/ in {workdir}")
  checkpoints = Checkpoints(workdir)
  step = checkpoints.latest_step() if step is None else step
  if step is None or step not in checkpoints.all_steps():
    raise ValueError(
      f"{checkpoints.directory}: no checkpoint {step} (steps "
      f"{checkpoints.all_steps()})"
    )
  state, meta = checkpoints.read(step)
  checkpoints.close()
  labels = meta.get("label_map")
  lm = build.load_model(config, len(labels) if labels else None)
  trainable, frozen = build.split_variables(config, lm.variables)
  restored = state["params"]
  _check_same(restored, trainable, f"{checkpoints.directory}/{step}")
  restored = qnn.unflatten(
    {p: jnp.asarray(v) for p, v in qnn.flatten(restored).items()}
  )
  lm.variables = qnn.merge_trees(restored, frozen)
  m = config.model
  base = build.resolve_checkpoint(m.checkpoint) if m.checkpoint else None
  spec = models.ModelSpec(lm.config, m.task, len(labels) if labels else None)
  return Run(config, lm, spec, restored, labels, base, step)


def export_adapter(
  workdir: str | pathlib.Path, out: str | pathlib.Path, step: int | None = None
) -> dict[str, Any]:
  """Writes the run's adapters as a PEFT LoRA adapter; returns its config."""
  run = restore(workdir, step)
  if run.config.train.mode == "full":
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
    bool(run.config.model.scan_layers),
    base,
  )


def export_merged(
  workdir: str | pathlib.Path,
  out: str | pathlib.Path,
  dtype: str = "float32",
  requantize: bool = False,
  step: int | None = None,
) -> pathlib.Path:
  """Writes the run's merged model as a Hugging Face folder."""
  run = restore(workdir, step)
  merged, _ = hf_export.merge(run.lm.variables, run.lm.plan, requantize)
  if run.base is not None:
    raw = json.loads((run.base / "config.json").read_text())
  else:
    hf_config = run.config.model.hf_config
    raw = hf_config.to_dict() if hasattr(hf_config, "to_dict") else hf_config
  return hf_export.write_merged(
    out,
    merged,
    run.spec,
    bool(run.config.model.scan_layers),
    base=run.base,
    raw_config=raw,
    dtype=dtype,
    labels=run.labels,
  )
