"""Runs the grid of a config's get_sweep(), one workdir per point.

python -m experiments.sweep --config configs/NAME.py --workdir DIR
  [--config.model.checkpoint=...]   (overrides apply to every point)

Resumable: finished points are skipped, an interrupted one resumes from its
checkpoint, a failing one is recorded (error.txt) and the others go on.
Then `python -m experiments.tables --sweep DIR` renders the results.
"""

import sys

from absl import flags
from ml_collections import config_flags

from qlora_jax.ablations import sweep
from qlora_jax.engine import cli

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Sweep directory.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  del argv
  path = flags.FLAGS["config"].config_filename
  module = sweep.config_module(path)
  if not hasattr(module, "get_sweep"):
    raise ValueError(f"{path} defines no get_sweep()")
  table = module.get_table() if hasattr(module, "get_table") else None
  results = sweep.run_sweep(
    _CONFIG.value, module.get_sweep(), _WORKDIR.value, table=table
  )
  sys.exit(0 if all(v == "done" for v in results.values()) else 1)


if __name__ == "__main__":
  cli.run(main)
