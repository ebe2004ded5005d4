"""experiments.export on a tiny trained run, and a run that starts from a
PEFT adapter (model.adapter)."""

import dataclasses
import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from qlora_jax import interop, models
from qlora_jax import nn as qnn
from qlora_jax.engine import export, restore, setup
from tests import tiny_config

ROOT = pathlib.Path(__file__).resolve().parent.parent
IDS = np.array([[2, 17, 14, 42, 8, 3], [2, 5, 6, 7, 3, 0]])


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  """The tiny BERT classification run (nf4 + LoRA), 2 steps."""
  return tiny_config.train_classifier(tmp_path_factory, steps=2, n_eval=8)[0]


@pytest.fixture(scope="module")
def restored(run):
  return restore.restore(run)


def _export(*args):
  cmd = [sys.executable, "-m", "experiments.export", *args]
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
  assert proc.returncode == 0, proc.stderr[-3000:]


def _logits(lm):
  segments = (IDS != 0).astype(np.int32)
  return np.asarray(lm.model.apply(lm.variables, IDS, segment_ids=segments))


def test_adapter_export_reloads_onto_the_base(run, restored, tmp_path):
  _export(f"--workdir={run}", f"--out={tmp_path}")
  config = json.loads((tmp_path / "adapter_config.json").read_text())
  assert config["task_type"] == "SEQ_CLS" and config["r"] == 4
  assert config["modules_to_save"] == ["classifier"]
  bert = tiny_config.ROOT / "data" / "hf" / "bert"
  assert config["base_model_name_or_path"] == str(bert.resolve())
  nf4 = {"data_type": "nf4", "block_size": 32, "double_quant": True}
  lm, _ = interop.from_peft(
    bert,
    tmp_path,
    task="classification",
    quant=nf4,
  )
  want = qnn.split_trainable(restored.lm.variables)[0]
  got = qnn.split_trainable(lm.variables)[0]
  for path, value in qnn.flatten(want).items():
    np.testing.assert_array_equal(qnn.flatten(got)[path], value)
  np.testing.assert_array_equal(_logits(lm), _logits(restored.lm))


def test_merged_export_and_requantized_reload(run, restored, tmp_path):
  out = tmp_path / "merged"
  _export(f"--workdir={run}", f"--out={out}", "--merged", "--dtype=bfloat16")
  config = json.loads((out / "config.json").read_text())
  assert config["dtype"] == "bfloat16" and config["id2label"]
  assert (out / "tokenizer.json").is_file()
  requant = tmp_path / "requant"
  export.export_merged(run, requant, requantize=True)
  merged, plan = interop.merge(restored.lm.variables, restored.lm.plan, True)
  model = interop.merged_model(restored.lm.model, plan)
  back = models.from_pretrained(requant, task="classification", num_labels=2)
  # from_pretrained starts a new classifier: put the trained one in.
  back.variables[qnn.PARAMS]["classifier"] = merged[qnn.PARAMS]["classifier"]
  seg = (IDS != 0).astype(np.int32)
  np.testing.assert_array_equal(
    back.model.apply(back.variables, IDS, seg),
    model.apply(merged, IDS, seg),
  )


def test_a_run_can_start_from_a_peft_adapter(run, restored, tmp_path):
  adapter = tmp_path / "adapter"
  export.export_adapter(run, adapter)
  settings = dataclasses.replace(
    restored.settings,
    model=dataclasses.replace(restored.settings.model, adapter=str(adapter)),
  )
  lm = setup.load_model(settings, setup.open_base(settings.model), 2)
  trainable, _ = setup.split_variables(settings, lm.variables)
  for path, value in qnn.flatten(restored.trainable).items():
    np.testing.assert_array_equal(qnn.flatten(trainable)[path], value)


def test_bad_workdir(tmp_path):
  with pytest.raises(ValueError, match="no config.json"):
    restore.restore(tmp_path)
