"""Trains and evaluates one config.

python -m experiments.train [--config configs/NAME.py] [--workdir DIR]
  [--config.lora.rank=16 ...]

With no flags it runs the main job: configs/default.py in runs/default.
Re-running the command resumes the run from its last checkpoint; a
workdir made by another config is refused (naming the differing fields).
"""

from absl import flags
from ml_collections import config_flags

from qlora_jax.engine import cli, train

_CONFIG = config_flags.DEFINE_config_file(
  "config", "configs/default.py", "Config file.", lock_config=True
)
_WORKDIR = flags.DEFINE_string("workdir", "runs/default", "Run directory.")
_ALLOW = flags.DEFINE_bool(
  "allow_safe_changes",
  False,
  "Continue a run in --workdir with other train.steps / epochs / eval_every"
  " / checkpoint_every than it was made with.",
)


def main(argv):
  del argv
  train.train_and_evaluate(_CONFIG.value, _WORKDIR.value, _ALLOW.value)


if __name__ == "__main__":
  cli.run(main)
