"""The engine on the main job's own config and on language modelling."""

import json

import pytest

from configs import default
from qlora_jax import train
from qlora_jax.metrics import read_metrics
from tests import tiny_config


def test_default_config_shrunk_runs_end_to_end(tmp_path, capsys):
  config = default.get_config()
  config.train.steps = 2
  config.train.batch_size = 16
  config.train.log_every = 1
  final = train.train_and_evaluate(config, str(tmp_path))
  out = capsys.readouterr().out
  # The pipeline summary, the table and where things went.
  assert "36 with adapters, 36 quantized (nf4, block 64 + double quant)" in out
  assert "4.127 bits/param" in out
  assert "predictions (eval):" in out and "final eval:" in out
  labels = json.loads((tmp_path / "labels.json").read_text())
  assert len(labels) == 8
  lines = (tmp_path / "predictions.jsonl").read_text().splitlines()
  assert len(lines) == 360  # every eval example, once
  assert 0.0 <= final["accuracy"] <= 1.0 and final["loss"] > 0


def _lm_files(folder, instruction=False):
  words = tiny_config.FIRST + tiny_config.SECOND
  with (folder / "train.jsonl").open("w") as f:
    for i in range(40):
      text = " ".join(words[(i + j) % len(words)] for j in range(6))
      if instruction:
        f.write(json.dumps({"prompt": text, "completion": " " + text}) + "\n")
      else:
        f.write(json.dumps({"text": text}) + "\n")
  (folder / "eval.jsonl").write_text(
    (folder / "train.jsonl").read_text().split("\n", 8)[0] + "\n"
  )


@pytest.mark.parametrize("instruction,packing", [(False, True), (True, False)])
def test_language_modelling_learns(tmp_path, instruction, packing):
  _lm_files(tmp_path, instruction)
  config = tiny_config.get_config(str(tmp_path))
  config.model.checkpoint = str(tiny_config.ROOT / "data/hf/llama_gqa")
  config.model.task = "causal_lm"
  config.data.packing = packing
  config.data.instruction = instruction
  config.data.max_length = 16
  config.train.steps = 16
  config.train.eval_every = 8
  config.opt.learning_rate = 1e-2
  final = train.train_and_evaluate(config, str(tmp_path / "run"))
  evals = [
    r
    for r in read_metrics(tmp_path / "run" / "metrics.jsonl")
    if r["kind"] == "eval"
  ]
  assert [r["step"] for r in evals] == [8, 16]
  assert "perplexity" in final
  # Memorising 40 short cyclic texts: the eval loss falls.
  assert evals[1]["loss"] < evals[0]["loss"]


def test_bad_configs_name_the_field(tmp_path):
  tiny_config.write_dataset(tmp_path)
  cases = [
    ("train.mode", lambda c: setattr(c.train, "mode", "qlora")),
    ("quant.data_type", lambda c: setattr(c.train, "mode", "full")),
    ("model.dtype", lambda c: setattr(c.model, "dtype", "float8")),
    ("data.source", lambda c: setattr(c.data, "source", "csv")),
    ("model.checkpoint", lambda c: setattr(c.model, "checkpoint", "nowhere")),
    ("model.task", lambda c: setattr(c.model, "task", "regression")),
    ("train.batch_size", lambda c: setattr(c.train, "batch_size", 7)),
    ("lora.targets", lambda c: setattr(c.lora, "targets", "nothing_matches")),
    ("opt.schedule", lambda c: setattr(c.opt, "schedule", "step")),
    ("mesh", lambda c: setattr(c.mesh, "fsdp", 3)),
  ]
  for field, mutate in cases:
    config = tiny_config.get_config(str(tmp_path))
    config.train.grad_accum = 2
    mutate(config)
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
      train.train_and_evaluate(config, str(tmp_path / "run"))
