"""PEFT adapters that do not fit: each error names the key at fault."""

import json
import pathlib
import shutil

import numpy as np
import pytest
import safetensors.numpy

from qlora_jax import interop, models

DATA = pathlib.Path(__file__).parent / "data"
LLAMA = DATA / "hf" / "llama_gqa"
FIXTURE = DATA / "peft" / "llama_gqa_lora"
PREFIX = "base_model.model.model.layers."


@pytest.fixture(scope="module")
def spec():
  return models.ModelSpec(
    models.read_config(LLAMA / "config.json"), "causal_lm"
  )


def _adapter(tmp_path, config=None, tensors=None, drop=()):
  """The fixture adapter with config keys and tensors changed."""
  folder = tmp_path / "adapter"
  shutil.copytree(FIXTURE, folder)
  raw = json.loads((FIXTURE / "adapter_config.json").read_text())
  raw.update(config or {})
  (folder / "adapter_config.json").write_text(json.dumps(raw))
  weights = folder / "adapter_model.safetensors"
  arrays = safetensors.numpy.load_file(str(weights))
  arrays.update(tensors or {})
  for key in drop:
    del arrays[key]
  safetensors.numpy.save_file(arrays, str(weights))
  return folder


def _raises(spec, folder, *fragments, scan=False):
  with pytest.raises(ValueError) as err:
    interop.read_adapter(folder, spec, scan)
  for fragment in fragments:
    assert fragment in str(err.value), str(err.value)


Q0 = PREFIX + "0.self_attn.q_proj"
MAG = PREFIX + "0.mlp.down_proj.lora_magnitude_vector"


@pytest.mark.parametrize(
  "config,fragments",
  [
    ({"peft_type": "PROMPT_TUNING"}, ["'peft_type'", "PROMPT_TUNING"]),
    ({"peft_type": "ADALORA"}, ["'peft_type'"]),
    ({"bias": "lora_only"}, ["'bias'", "lora_only"]),
    ({"task_type": "SEQ_CLS"}, ["'task_type'", "SEQ_CLS"]),
    ({"init_lora_weights": "pissa"}, ["'init_lora_weights'", "pissa"]),
    ({"layers_to_transform": [0]}, ["'layers_to_transform'"]),
    ({"lora_bias": True}, ["'lora_bias'"]),
    ({"target_modules": ["q_proj", "qkv"]}, ["'target_modules'", "qkv"]),
    ({"target_modules": "model\\.nothing"}, ["'target_modules'"]),
    ({"target_modules": "all-linear"}, ["'target_modules'", "all-linear"]),
    ({"r": 8}, ["lora_A.weight", "(8, 64)"]),
    ({"rank_pattern": {}}, ["down_proj.lora_A.weight", "(4, 160)"]),
    ({"use_dora": True}, ["missing", "lora_magnitude_vector"]),
    (
      {"target_modules": ["q_proj", "k_proj"]},
      ["down_proj.lora_A.weight", "not an adapted linear layer"],
    ),
  ],
)
def test_bad_config(spec, tmp_path, config, fragments):
  _raises(spec, _adapter(tmp_path, config), *fragments)


def test_bad_tensors(spec, tmp_path):
  a = np.zeros((4, 64), np.float32)
  cases = [
    ({Q0 + ".lora_A.weight": np.zeros((4, 63), np.float32)}, (), [Q0, "63"]),
    ({MAG: np.ones((64,), np.float32)}, (), [MAG, "'use_dora' is false"]),
    ({Q0 + ".lora_E": a}, (), [Q0 + ".lora_E", "modules_to_save"]),
    ({"model.layers.0.q.lora_A.weight": a}, (), ["does not start"]),
    ({Q0 + ".lora_A.weight": a * np.nan}, (), [Q0, "non-finite"]),
    ({}, (Q0 + ".lora_B.weight",), ["missing", Q0 + ".lora_B.weight"]),
  ]
  for i, (tensors, drop, fragments) in enumerate(cases):
    _raises(spec, _adapter(tmp_path / str(i), None, tensors, drop), *fragments)


def test_the_wrong_base(tmp_path):
  gpt2 = models.read_config(DATA / "hf" / "gpt2" / "config.json")
  spec = models.ModelSpec(gpt2, "causal_lm")
  _raises(spec, _adapter(tmp_path), "'target_modules'", "down_proj")


def test_scanned_layers_need_one_rank_per_stack(spec, tmp_path):
  config = {"rank_pattern": {"model.layers.0.mlp.down_proj": 2}}
  folder = _adapter(tmp_path, config)
  _raises(
    spec, folder, "model/layers/mlp/down_proj", "scan_layers=False", scan=True
  )


def test_missing_files(spec, tmp_path):
  _raises(spec, tmp_path, "adapter_config.json")
  folder = _adapter(tmp_path)
  (folder / "adapter_model.safetensors").unlink()
  _raises(spec, folder, "adapter_model.safetensors")
