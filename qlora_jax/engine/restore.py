"""A finished run restored: its model with a checkpoint's trainable tree.

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

from qlora_jax import models
from qlora_jax import nn as qnn
from qlora_jax.engine import setup
from qlora_jax.engine.checkpoint import Checkpoints
from qlora_jax.engine.settings import Settings, recorded


@dataclasses.dataclass
class Restored:
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


def restore(workdir: str | pathlib.Path, step: int | None = None) -> Restored:
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
  opened = setup.open_base(settings.model, settings.data.chat_template)
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
  return Restored(
    settings, lm, spec, restored, labels, opened.path, step, opened.tokenizer
  )
