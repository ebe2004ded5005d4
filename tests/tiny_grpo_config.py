"""A tiny GRPO run for the engine tests: the Llama fixture (NF4 + LoRA)
with tiny_dpo_config's chat template, on prompts whose reward is 1 when
the completion contains the word "have".

python -m experiments.train --config tests/tiny_grpo_config.py:DATA_DIR ...
DATA_DIR must hold model/, prompts.jsonl and eval.jsonl (see write_run).
"""

import json
import pathlib
import random

from configs import base
from tests import tiny_dpo_config

TARGET = "have"


def write_run(folder, n_train: int = 32, n_eval: int = 8) -> None:
  """tiny_dpo_config's model/, and prompts of its words answered by any
  completion containing TARGET."""
  folder = pathlib.Path(folder)
  tiny_dpo_config.write_run(folder, 1, 1)
  rng = random.Random(0)
  for name, n in (("prompts", n_train), ("eval", n_eval)):
    with (folder / f"{name}.jsonl").open("w") as f:
      for _ in range(n):
        words = rng.choices(tiny_dpo_config.PROMPT, k=rng.randint(2, 6))
        f.write(json.dumps({"prompt": " ".join(words), "answer": TARGET}))
        f.write("\n")


def get_config(data_dir: str = ""):
  folder = pathlib.Path(data_dir)
  c = base.get_config()
  c.model.checkpoint = str(folder / "model")
  c.quant.block_size = 32
  c.lora.rank = 4
  c.lora.dropout = 0.0
  c.data.source = "jsonl"
  c.data.train_path = str(folder / "prompts.jsonl")
  c.data.eval_path = str(folder / "eval.jsonl")
  c.data.max_length = 16  # prompts of up to 13 tokens, 4 new ones
  c.train.objective = "grpo"
  c.grpo.group_size = 4
  c.grpo.max_new_tokens = 4
  c.grpo.reward = "contains"
  c.grpo.beta = 0.04
  c.grpo.mu = 2  # two optimizer steps per generation batch
  c.train.batch_size = 8  # prompts: 32 completions per generation batch
  c.train.steps = 12
  c.train.eval_every = 6
  c.train.checkpoint_every = 4
  c.train.log_every = 1
  c.opt.learning_rate = 2e-2
  c.opt.schedule = "constant"
  c.opt.warmup_ratio = 0.0
  return c
