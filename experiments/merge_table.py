"""Table 8: the cost of merging an adapter into its 4-bit base.

python -m experiments.merge_table --workdir results/table8 [--seeds 0,1,2]
    [--config configs/table8_merge.py]

Trains, per seed, the config's QLoRA NF4 + DQ and QA-LoRA int4_asym runs
(each in its own process; a rerun resumes) and evaluates the six rows of
`qlora_jax.ablations.merging` (adapter on base, merged to float, merged and
re-quantized; QA-LoRA on base, merged exactly, exported as Q4_1 GGUF and
read back). Writes WORKDIR/rows.jsonl (one line per seed and row) and
WORKDIR/table.md (mean +- 95% Student t interval over seeds, and n); the
last line printed is one JSON object of the means.
"""

import json
import pathlib

from absl import flags
from ml_collections import config_flags

from qlora_jax.ablations import merging, results
from qlora_jax.engine import cli

_CONFIG = config_flags.DEFINE_config_file("config", "configs/table8_merge.py")
_WORKDIR = flags.DEFINE_string("workdir", "results/table8", "Output folder.")
_SEEDS = flags.DEFINE_list("seeds", ["0", "1", "2"], "Seeds to run.")


def main(argv):
  del argv
  out = pathlib.Path(_WORKDIR.value)
  out.mkdir(parents=True, exist_ok=True)
  seeds = [int(s) for s in _SEEDS.value]
  rows = merging.run_table(_CONFIG.value, out, seeds)
  table = merging.markdown(rows)
  (out / "table.md").write_text(table)
  print(table)
  means = {}
  for row in merging.ROWS:
    for key, _, _ in merging.COLUMNS:
      values = [r[key] for r in rows if r["row"] == row and key in r]
      if values:
        means[f"{row}_{key}"] = results.interval(values)[0]
  print(json.dumps(means))


if __name__ == "__main__":
  cli.run(main)
