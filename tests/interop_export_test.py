"""experiments.export on a tiny trained run, and a run that starts from a
PEFT adapter (model.adapter); the run's outputs written whole, by one
writer, never into the run or over an input."""

import dataclasses
import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
import safetensors.numpy

from qlora_jax import interop, models
from qlora_jax import nn as qnn
from qlora_jax.engine import export, outputs, predict, restore, setup
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


# Outputs of a finished run (engine.outputs): the previous output survives
# a failed or interrupted replacement, one writer wins, nothing is written
# into the run, the input or the base, files get the usual modes.


def _files(folder: pathlib.Path) -> dict[str, bytes]:
  return {
    str(p.relative_to(folder)): p.read_bytes()
    for p in sorted(folder.rglob("*"))
    if p.is_file()
  }


def _interrupted_after_save(monkeypatch):
  """safetensors writes its file, then Ctrl-C (before config.json)."""
  save = safetensors.numpy.save_file

  def save_then_interrupt(*args, **kwargs):
    save(*args, **kwargs)
    raise KeyboardInterrupt

  monkeypatch.setattr(safetensors.numpy, "save_file", save_then_interrupt)


def test_a_failed_overwrite_keeps_the_previous_export(
  run, tmp_path, monkeypatch
):
  old = tmp_path / "old"
  old.mkdir()  # a previous export
  for name in ("config.json", "model.safetensors", "tokenizer.json"):
    (old / name).write_text(f"previous {name}")
  before = _files(old)
  with pytest.raises(ValueError, match="no checkpoint 999"):
    export.export_merged(run, old, step=999, overwrite=True)
  assert _files(old) == before
  _interrupted_after_save(monkeypatch)
  with pytest.raises(KeyboardInterrupt):
    export.export_merged(run, old, "bfloat16", overwrite=True)
  assert _files(old) == before
  assert [p.name for p in tmp_path.iterdir()] == ["old"]  # no temporary


def test_two_exports_to_one_new_out_one_wins(run, tmp_path, monkeypatch):
  out = tmp_path / "adapter"
  refused = []
  restore_run = export.restore

  def restore_while_another_starts(*args):
    if not refused:  # the second writer starts while the first restores
      with pytest.raises(outputs.OutputError) as e:
        export.export_adapter(run, out)
      refused.append(str(e.value))
    return restore_run(*args)

  monkeypatch.setattr(export, "restore", restore_while_another_starts)
  export.export_adapter(run, out)
  assert "being written by process" in refused[0] and str(out) in refused[0]
  assert sorted(p.name for p in out.iterdir()) == [
    "adapter_config.json",
    "adapter_model.safetensors",
  ]


def test_exports_never_write_into_the_run(run, tmp_path):
  before = _files(run)
  (tmp_path / "link").symlink_to(run)
  for out in (
    run / "checkpoints" / "999",
    tmp_path / "link" / "adapter",
    run / ".." / run.name,
  ):
    with pytest.raises(ValueError, match="the run's workdir"):
      export.export_adapter(run, out, overwrite=True)
  assert _files(run) == before


def test_exported_files_get_the_usual_modes(run, tmp_path):
  mask = os.umask(0o022)
  try:
    export.export_adapter(run, tmp_path / "adapter")
  finally:
    os.umask(mask)
  for p in (tmp_path / "adapter").iterdir():
    assert p.stat().st_mode & 0o777 == 0o644, p.name


def test_predictions_never_overwrite_inputs_or_the_run(run, tmp_path):
  data = tmp_path / "in.jsonl"
  data.write_text('{"text": "the of and to in"}\n')
  before, config = _files(run), (run / "config.json").read_bytes()
  for out in (data, run / "config.json", tiny_config.ROOT / "data/hf/bert"):
    with pytest.raises(ValueError, match="refusing to write"):
      predict.check_out(run, data, out, overwrite=True)
  predictor = predict.load(run)
  for out in (data, run / "config.json", run / "predictions.jsonl"):
    with pytest.raises(ValueError, match="refusing to write"):
      predict.predict_file(predictor, data, out, overwrite=True)
  assert _files(run) == before and data.read_text().startswith('{"text"')
  assert (run / "config.json").read_bytes() == config
  out = tmp_path / "out.jsonl"
  predict.predict_file(predictor, data, out)
  with pytest.raises(ValueError, match="pass --overwrite"):
    predict.predict_file(predictor, data, out)
  assert json.loads(out.read_text())["predicted"] in ("first", "second")
