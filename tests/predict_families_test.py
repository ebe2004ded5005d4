"""Predictions of Qwen3, Gemma 3 and Phi-3 runs (experiments.predict's
library path) on the tiny fixtures of tests/data/hf.

Each family trains 2 steps (batch 4) of NF4 QLoRA through the engine,
answering its eval prompts by greedy generation at the end
(predictions.jsonl, from the adapters in memory). Its workdir is then
restored from disk as `experiments.predict` restores it, and must give
the same completions (exact: the same tokens) with adapters that are the
trained ones.
"""

import json

import numpy as np
import pytest

from qlora_jax import nn as qnn
from qlora_jax.engine import predict, train
from tests import tiny_config

WORDS = tiny_config.FIRST + tiny_config.SECOND


@pytest.mark.parametrize("name", ["qwen3", "gemma3_text", "phi3"])
def test_a_restored_run_predicts_what_the_run_generated(name, tmp_path):
  data_dir = tmp_path / "data"
  data_dir.mkdir()
  rows = [
    " ".join(WORDS[(i + j) % len(WORDS)] for j in range(4)) for i in range(8)
  ]
  with (data_dir / "train.jsonl").open("w") as f:
    for text in rows:
      f.write(json.dumps({"prompt": text, "completion": " " + text}) + "\n")
  (data_dir / "eval.jsonl").write_text(
    "".join(
      json.dumps({"prompt": t, "completion": " " + t}) + "\n" for t in rows[:3]
    )
  )
  config = tiny_config.get_config(str(data_dir))
  config.model.checkpoint = str(tiny_config.ROOT / "data" / "hf" / name)
  config.model.task = "causal_lm"
  config.data.instruction = True
  config.data.chat_template = "none"  # the base has none: plain text
  config.data.max_length = 16
  config.data.eval_generate = 3
  config.data.max_new_tokens = 5
  config.train.batch_size = 4
  config.train.steps = 2
  config.train.eval_every = 2
  config.train.show_predictions = 0
  config.opt.learning_rate = 1e-2
  workdir = tmp_path / "run"
  train.train_and_evaluate(config, str(workdir))
  said = [
    json.loads(line)
    for line in (workdir / "predictions.jsonl").read_text().splitlines()
  ]
  predictor = predict.load(workdir)
  # The restored adapters are the trained ones (B starts at zero).
  trainable, _ = qnn.split_trainable(predictor.run.lm.variables)
  b = [v for k, v in qnn.flatten(trainable).items() if k[-1] == "lora_b"]
  assert b and all(np.abs(np.asarray(v)).max() > 0 for v in b)
  got = predict.complete(
    predictor, [r["prompt"] for r in said], max_new_tokens=5
  )
  print(f"{name}: {got}")
  assert got == [r["generated"] for r in said]
  assert any(got)
