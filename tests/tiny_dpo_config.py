"""A tiny DPO run for the engine tests: the Llama fixture (NF4 + LoRA)
with a chat template, on generated preference pairs.

python -m experiments.train --config tests/tiny_dpo_config.py:DATA_DIR ...
DATA_DIR must hold model/, train.jsonl and eval.jsonl (see write_run).
"""

import json
import pathlib
import random
import shutil

from configs import base

ROOT = pathlib.Path(__file__).resolve().parent
FIXTURE = ROOT / "data" / "hf" / "llama_gqa"
# A ChatML-like template over the fixture's word vocabulary (whitespace
# pre-tokenizer): every piece is its own token.
TEMPLATE = (
  "{% for m in messages %}<s> {{ m['role'] }} {{ m['content'] }} </s> "
  "{% endfor %}{% if add_generation_prompt %}<s> assistant {% endif %}"
)
PROMPT = "the of and to in is was for on that with as by at from it".split()
CHOSEN = "have had one were they their".split()
REJECTED = "all has been she her when".split()


def write_run(folder, n_train: int = 32, n_eval: int = 8) -> None:
  """The fixture with TEMPLATE as model/, and pairs whose chosen answer
  is words of CHOSEN and rejected one words of REJECTED."""
  folder = pathlib.Path(folder)
  folder.mkdir(parents=True, exist_ok=True)
  shutil.copytree(FIXTURE, folder / "model", dirs_exist_ok=True)
  (folder / "model" / "tokenizer_config.json").write_text(
    json.dumps({"chat_template": TEMPLATE})
  )
  rng = random.Random(0)
  for name, n in (("train", n_train), ("eval", n_eval)):
    with (folder / f"{name}.jsonl").open("w") as f:
      for _ in range(n):
        row = {
          "prompt": " ".join(rng.choices(PROMPT, k=rng.randint(2, 6))),
          "chosen": " ".join(rng.choices(CHOSEN, k=rng.randint(1, 3))),
          "rejected": " ".join(rng.choices(REJECTED, k=rng.randint(1, 3))),
        }
        f.write(json.dumps(row) + "\n")


def get_config(data_dir: str = ""):
  folder = pathlib.Path(data_dir)
  c = base.get_config()
  c.model.checkpoint = str(folder / "model")
  c.quant.block_size = 32
  c.lora.rank = 4
  c.lora.dropout = 0.1
  c.data.source = "jsonl"
  c.data.instruction = True
  c.data.train_path = str(folder / "train.jsonl")
  c.data.eval_path = str(folder / "eval.jsonl")
  c.data.max_length = 20
  c.train.objective = "dpo"
  c.dpo.beta = 0.5
  c.train.batch_size = 4
  c.train.steps = 16
  c.train.eval_every = 8
  c.train.log_every = 1
  c.opt.learning_rate = 1e-2
  return c
