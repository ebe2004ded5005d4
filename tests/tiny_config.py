"""A tiny classification run for the engine tests: the BERT fixture with
nf4 + LoRA on a generated two-class task.

python -m experiments.train --config tests/tiny_config.py:DATA_DIR ...
DATA_DIR must hold train.jsonl and eval.jsonl (see write_dataset).
"""

import json
import pathlib
import random

from configs import minilm_docstrings

ROOT = pathlib.Path(__file__).resolve().parent
FIRST = "the of and to in is was for on that with as by at from it".split()
SECOND = "have had one were they their all has been she her when".split()


def write_dataset(folder, n_train: int = 48, n_eval: int = 16) -> None:
  """Texts of words from one of two word lists, labelled by the list."""
  rng = random.Random(0)
  folder = pathlib.Path(folder)
  folder.mkdir(parents=True, exist_ok=True)
  for name, n in (("train", n_train), ("eval", n_eval)):
    with (folder / f"{name}.jsonl").open("w") as f:
      for i in range(n):
        label = "first" if i % 2 == 0 else "second"
        words = FIRST if label == "first" else SECOND
        text = " ".join(rng.choice(words) for _ in range(rng.randint(3, 9)))
        f.write(json.dumps({"text": text, "label": label}) + "\n")


def get_config(data_dir: str = ""):
  c = minilm_docstrings.get_config()
  c.model.checkpoint = str(ROOT / "data" / "hf" / "bert")
  c.data.source = "jsonl"
  c.data.train_path = str(pathlib.Path(data_dir) / "train.jsonl")
  c.data.eval_path = str(pathlib.Path(data_dir) / "eval.jsonl")
  c.data.max_length = 12
  c.lora.rank = 4
  c.lora.dropout = 0.1
  c.quant.block_size = 32
  c.train.batch_size = 8
  c.train.steps = 12
  c.train.eval_every = 6
  c.train.log_every = 1
  c.train.show_predictions = 2
  c.opt.learning_rate = 3e-3
  return c


def train_classifier(tmp_path_factory, steps: int, n_eval: int):
  """Trains the tiny BERT classifier (nf4 + LoRA) for `steps` steps on 16
  training texts; returns (workdir, eval file, final eval metrics)."""
  from qlora_jax.engine import train  # noqa: PLC0415

  data_dir = tmp_path_factory.mktemp("data")
  write_dataset(data_dir, n_train=16, n_eval=n_eval)
  config = get_config(str(data_dir))
  config.train.steps = steps
  config.train.eval_every = steps
  workdir = tmp_path_factory.mktemp("run")
  final = train.train_and_evaluate(config, str(workdir))
  return workdir, data_dir / "eval.jsonl", final
