"""PEFT adapters out and back in: the identity, and PEFT's own fixture.

Reference: tests/data/peft/llama_gqa_lora, an adapter PEFT 0.21.2 saved for
the tiny Llama, with the adapted model's logits (f32). Tolerance: max-norm
relative error <= 1e-4 (quantization off, float32 compute), as in
models_parity_test.
"""

import json
import pathlib

import numpy as np
import pytest
from safetensors import safe_open

from qlora_jax import interop, models
from qlora_jax import nn as qnn
from qlora_jax.interop import peft_config
from tests.interop_helpers import randomize, rel_error

DATA = pathlib.Path(__file__).parent / "data"
LLAMA = DATA / "hf" / "llama_gqa"
FIXTURE = DATA / "peft" / "llama_gqa_lora"
SEVEN = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj"]
SEVEN += ["down_proj"]
FIXTURE_LORA = {
  "targets": SEVEN,
  "rank": 4,
  "alpha": 8,
  "rank_pattern": {"down_proj": 2},
  "alpha_pattern": {"down_proj": 4},
}


def _keys(folder) -> dict[str, tuple[int, ...]]:
  path = pathlib.Path(folder) / "adapter_model.safetensors"
  with safe_open(str(path), "numpy") as f:
    return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}


def _export(lm, folder, task="causal_lm", scan=False, patterns=()):
  spec = models.ModelSpec(lm.config, task, _num_labels(lm))
  trainable, _ = qnn.split_trainable(lm.variables, patterns)
  config = interop.write_adapter(folder, trainable, lm.plan, spec, scan, "b")
  return spec, trainable, config


def _num_labels(lm):
  head = lm.variables.get(qnn.PARAMS, {}).get("classifier")
  return None if head is None else int(head["kernel"].shape[1])


def _write(lm, folder, task="causal_lm", scan=False, patterns=()):
  _export(lm, folder, task, scan, patterns)
  return folder


def _assert_trees_equal(a, b):
  fa, fb = qnn.flatten(a), qnn.flatten(b)
  assert sorted(fa) == sorted(fb)
  for path in fa:
    np.testing.assert_array_equal(np.asarray(fa[path]), np.asarray(fb[path]))


def test_fixture_import_gives_peft_logits():
  lm, adapter = interop.from_peft(LLAMA, FIXTURE)
  ref = np.load(FIXTURE / "reference.npz")
  err = rel_error(lm.model.apply(lm.variables, ref["input_ids"]), ref["logits"])
  print(f"PEFT fixture imported: max rel error {err:.2e}")
  assert err <= 1e-4
  down = lm.plan.lookup("model/layers_1/mlp/down_proj").lora
  assert (down.rank, down.alpha) == (2, 4.0)
  assert lm.plan.lookup("model/layers_1/self_attn/q_proj").lora.rank == 4
  assert adapter.train_paths == []


def test_fixture_import_into_scanned_layers_gives_the_same_logits():
  lm, _ = interop.from_peft(LLAMA, FIXTURE, scan_layers=True)
  ref = np.load(FIXTURE / "reference.npz")
  a = lm.variables[qnn.PARAMS]["model"]["layers"]["mlp"]["down_proj"]
  assert a["lora_a"].shape == (2, 160, 2)  # [layer, in, r]
  assert (
    rel_error(lm.model.apply(lm.variables, ref["input_ids"]), ref["logits"])
    <= 1e-4
  )


@pytest.mark.parametrize("scan", [False, True])
def test_export_matches_the_fixture_peft_saved(tmp_path, scan):
  lm = models.from_pretrained(LLAMA, lora=FIXTURE_LORA, scan_layers=scan)
  _, _, config = _export(lm, tmp_path, scan=scan)
  assert _keys(tmp_path) == _keys(FIXTURE)
  written = json.loads((tmp_path / "adapter_config.json").read_text())
  assert written == config
  fixture = json.loads((FIXTURE / "adapter_config.json").read_text())
  for key, value in config.items():
    if key != "base_model_name_or_path":
      assert fixture[key] == value, key


def test_round_trip_llama_with_patterns_is_the_identity(tmp_path):
  lm = randomize(models.from_pretrained(LLAMA, lora=FIXTURE_LORA))
  lm_in, adapter = interop.from_peft(LLAMA, _write(lm, tmp_path))
  assert lm_in.plan == lm.plan
  _assert_trees_equal(
    qnn.split_trainable(lm_in.variables)[0],
    qnn.split_trainable(lm.variables)[0],
  )


@pytest.mark.parametrize(
  "name,lora,scan",
  [
    ("gpt2", {"targets": ["c_attn", "c_proj", "c_fc"], "rank": 4}, False),
    ("llama_gqa", {"rank": 4, "rslora": True, "dora": True}, False),
    ("llama_gqa", {"targets": "layers_0/.*(q|v)_proj", "rank": 2}, False),
    ("llama_gqa", {"rank": 4, "alpha": 4, "dora": True}, True),
  ],
  ids=["gpt2", "dora_rslora", "regex_subset", "scanned_dora"],
)
def test_round_trip_is_the_identity(tmp_path, name, lora, scan):
  base = DATA / "hf" / name
  lm = randomize(models.from_pretrained(base, lora=lora, scan_layers=scan))
  _, _, config = _export(lm, tmp_path, scan=scan)
  lm_in, _ = interop.from_peft(base, tmp_path, scan_layers=scan)
  assert lm_in.plan == lm.plan
  _assert_trees_equal(
    qnn.split_trainable(lm_in.variables)[0],
    qnn.split_trainable(lm.variables)[0],
  )
  assert config["fan_in_fan_out"] == (name == "gpt2")
  if name == "gpt2":  # PEFT's Conv1D adapters are [r, in] / [out, r] too
    keys = _keys(tmp_path)
    c_attn = "base_model.model.transformer.h.0.attn.c_attn"
    assert keys[c_attn + ".lora_A.weight"] == (4, 64)
    assert keys[c_attn + ".lora_B.weight"] == (192, 4)
  if lora.get("dora"):
    key = "base_model.model.model.layers.1.mlp.down_proj.lora_magnitude_vector"
    assert _keys(tmp_path)[key] == (64,)
  if isinstance(lora.get("targets"), str):
    assert isinstance(config["target_modules"], str)
    assert config["target_modules"] == (
      r"(model\.layers\.0\.self_attn\.q_proj|model\.layers\.0\.self_attn\.v_proj)"
    )


def test_bert_classifier_is_saved_as_modules_to_save(tmp_path):
  bert = DATA / "hf" / "bert"
  kw = {"task": "classification", "num_labels": 3}
  lm = randomize(
    models.from_pretrained(
      bert, lora={"targets": "all-linear", "rank": 2}, **kw
    )
  )
  _, _, config = _export(lm, tmp_path, "classification")
  assert config["task_type"] == "SEQ_CLS"
  assert config["modules_to_save"] == ["classifier"]
  # "dense" would also select BERT's pooler, which the model lacks: a regex
  # that PEFT full-matches selects exactly the adapted layers.
  target = config["target_modules"]
  assert isinstance(target, str)
  names = interop.naming.Names(models.ModelSpec(lm.config, **kw), False)
  every = list(names.linear_modules()) + names.unused_linears()
  chosen = peft_config.targeted(config, "x", every)
  assert len(chosen) == 12 and "bert.pooler.dense" not in chosen
  keys = _keys(tmp_path)
  assert keys["base_model.model.classifier.weight"] == (3, 64)
  assert keys["base_model.model.classifier.bias"] == (3,)
  lm_in, _ = interop.from_peft(bert, tmp_path, task="classification")
  _assert_trees_equal(lm_in.variables[qnn.PARAMS], lm.variables[qnn.PARAMS])


def test_trained_base_modules_go_to_modules_to_save(tmp_path):
  lm = randomize(models.from_pretrained(LLAMA, lora={"targets": ["q_proj"]}))
  patterns = ["model/norm/"]
  spec, trainable, config = _export(lm, tmp_path, patterns=patterns)
  assert config["modules_to_save"] == ["model.norm"]
  assert _keys(tmp_path)["base_model.model.model.norm.weight"] == (64,)
  lm_in, adapter = interop.from_peft(LLAMA, tmp_path)
  assert adapter.train_paths == ["model/norm/scale"]
  back, _ = qnn.split_trainable(lm_in.variables, adapter.train_patterns)
  _assert_trees_equal(back, trainable)


def test_a_module_trained_in_part_cannot_be_exported(tmp_path):
  gpt2 = DATA / "hf" / "gpt2"
  lm = models.from_pretrained(gpt2, lora={"targets": ["c_attn"]})
  with pytest.raises(ValueError, match="transformer.ln_f is trained only in"):
    _export(lm, tmp_path, patterns=["transformer/ln_f/scale"])
