"""Preference pairs for DPO from a model's own wrong answers.

python -m experiments.preference_pairs --config configs/default.py \
  --out results/dpo_docstrings/pairs [--max_new_tokens 32]

The config's docstring questions (data.source "stdlib_questions") are
answered greedily by its model with adapters off; each wrong answer is a
pair, chosen = the expected package name, rejected = the model's answer
(`qlora_jax.engine.preference_pairs`). Writes OUT/train.jsonl and
OUT/eval.jsonl (and the questions under OUT/questions) and prints the
counts.
"""

import json
import pathlib

from absl import flags
from ml_collections import config_flags

from qlora_jax.engine import cli, preference_pairs
from qlora_jax.engine.settings import Settings

_CONFIG = config_flags.DEFINE_config_file(
  "config", "configs/default.py", "Config file.", lock_config=True
)
_OUT = flags.DEFINE_string("out", None, "Folder of the pairs.", required=True)
_MAX_NEW = flags.DEFINE_integer(
  "max_new_tokens", 32, "Tokens of each generated answer."
)


def main(argv):
  del argv
  s = Settings.from_config(_CONFIG.value)
  counts = preference_pairs.write_pairs(
    s, pathlib.Path(_OUT.value), _MAX_NEW.value
  )
  print(json.dumps(counts))


if __name__ == "__main__":
  cli.run(main)
