"""Renders a sweep as Markdown and LaTeX tables and PNG figures.

python -m experiments.tables --sweep DIR [--out DIR/tables]
"""

from absl import flags

from qlora_jax.ablations import tables
from qlora_jax.engine import cli

_SWEEP = flags.DEFINE_string("sweep", None, "Sweep directory.")
_OUT = flags.DEFINE_string("out", None, "Output folder (default SWEEP/tables).")
flags.mark_flag_as_required("sweep")


def main(argv):
  del argv
  paths = tables.write(_SWEEP.value, _OUT.value)
  for path in paths:
    print(path)
  print(paths[0].read_text())  # table.md


if __name__ == "__main__":
  cli.run(main)
