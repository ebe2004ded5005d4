"""Trains and evaluates one config.

python -m experiments.train [--config configs/NAME.py] [--workdir DIR]
  [--config.lora.rank=16 ...]

With no flags it runs the main job: configs/default.py in runs/default.
"""

from absl import app, flags
from ml_collections import config_flags

from qlora_jax import train

_CONFIG = config_flags.DEFINE_config_file(
  "config", "configs/default.py", "Config file.", lock_config=True
)
_WORKDIR = flags.DEFINE_string("workdir", "runs/default", "Run directory.")


def main(argv):
  del argv
  # Devices are logged once jax.distributed (if configured) is initialised.
  train.train_and_evaluate(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
  app.run(main)
