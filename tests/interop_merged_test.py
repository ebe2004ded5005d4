"""Merged models written as Hugging Face folders, and read back.

The float export is read back with `models.from_pretrained` (itself checked
against transformers in models_parity_test) and must give the in-memory
merged model's outputs exactly; so must the re-quantized export, which
loads without any float copy of its quantized weights.
"""

import json
import pathlib

import ml_dtypes
import numpy as np
import pytest
from safetensors import safe_open

from qlora_jax import interop, models, quant
from qlora_jax import nn as qnn
from tests.interop_helpers import IDS, randomize

DATA = pathlib.Path(__file__).parent / "data"
LLAMA = DATA / "hf" / "llama_gqa"
NF4 = {"data_type": "nf4", "block_size": 32, "double_quant": True}
LORA = {"rank": 4, "alpha": 8, "rank_pattern": {"down_proj": 2}}


def _keys(folder) -> dict:
  with safe_open(str(folder / "model.safetensors"), "numpy") as f:
    return {k: f.get_slice(k).get_dtype() for k in f.keys()}


def _merged_outputs(lm, requantize):
  merged, plan = interop.merge(lm.variables, lm.plan, requantize)
  model = interop.merged_model(lm.model, plan)
  return merged, model.apply(merged, IDS)


def _write(lm, folder, merged, base, scan=False, **kw):
  spec = models.ModelSpec(lm.config, "causal_lm")
  raw = json.loads((base / "config.json").read_text())
  return interop.write_merged(
    folder, merged, spec, scan, base=base, raw_config=raw, **kw
  )


@pytest.fixture(scope="module")
def llama_nf4():
  return randomize(models.from_pretrained(LLAMA, lora=LORA, quant=NF4))


def test_float_merge_reloads_exactly_and_equals_the_adapted_model(
  llama_nf4, tmp_path
):
  merged, want = _merged_outputs(llama_nf4, requantize=False)
  adapted = llama_nf4.model.apply(llama_nf4.variables, IDS)
  err = float(np.abs(want - adapted).max() / np.abs(adapted).max())
  assert err < 1e-5  # the same weights, summed in another order
  out = _write(llama_nf4, tmp_path, merged, LLAMA)
  assert set(_keys(out).values()) == {"F32"}
  assert (out / "tokenizer.json").is_file()
  assert json.loads((out / "config.json").read_text())["dtype"] == "float32"
  back = models.from_pretrained(out)
  np.testing.assert_array_equal(back.model.apply(back.variables, IDS), want)


def test_requantized_merge_reloads_exactly_without_float_copies(
  llama_nf4, tmp_path
):
  merged, want = _merged_outputs(llama_nf4, requantize=True)
  out = _write(llama_nf4, tmp_path, merged, LLAMA)
  keys = _keys(out)
  q = "model.layers.1.mlp.down_proj.weight"
  assert q not in keys and keys[q + ".codes"] == "U8"
  section = json.loads((out / "config.json").read_text())
  section = section["qlora_jax_quantization"]
  assert section["data_type"] == "nf4" and section["block_size"] == 32
  assert section["tensors"][q] == [64, 160]
  back = models.from_pretrained(out)
  np.testing.assert_array_equal(back.model.apply(back.variables, IDS), want)
  w = back.variables[qnn.BASE]["model"]["layers_1"]["mlp"]["down_proj"]
  assert isinstance(w["weight"], quant.QuantizedTensor)
  for part in ("codes", "absmax", "absmax2", "offset"):
    np.testing.assert_array_equal(
      getattr(w["weight"], part),
      getattr(
        merged["base"]["model"]["layers_1"]["mlp"]["down_proj"]["weight"], part
      ),
    )
  # Stacked for scanned layers, and new adapters start from it (B = 0).
  scanned = models.from_pretrained(
    out, scan_layers=True, lora={"rank": 2, "dora": True}
  )
  got = scanned.model.apply(scanned.variables, IDS)
  np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * np.abs(want).max())
  with pytest.raises(ValueError, match="quant=None"):
    models.from_pretrained(out, quant=NF4)


def test_scanned_model_exports_per_layer_in_bfloat16(tmp_path):
  lm = randomize(
    models.from_pretrained(LLAMA, lora=LORA, quant=NF4, scan_layers=True)
  )
  merged, want = _merged_outputs(lm, requantize=False)
  out = _write(lm, tmp_path, merged, LLAMA, scan=True, dtype="bfloat16")
  keys = _keys(out)
  assert set(keys.values()) == {"BF16"}
  assert "model.layers.1.self_attn.q_proj.weight" in keys
  assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
  back = models.from_pretrained(out)
  got = back.model.apply(back.variables, IDS)
  assert float(np.abs(got - want).max() / np.abs(want).max()) < 2e-2
  with safe_open(str(out / "model.safetensors"), "numpy") as f:
    w = f.get_tensor("model.norm.weight")
  assert w.dtype == ml_dtypes.bfloat16


def test_gpt2_conv1d_weights_are_written_in_out(tmp_path):
  gpt2 = DATA / "hf" / "gpt2"
  lm = randomize(models.from_pretrained(gpt2, lora={"rank": 4}, quant=NF4))
  merged, want = _merged_outputs(lm, requantize=False)
  out = _write(lm, tmp_path, merged, gpt2)
  with safe_open(str(out / "model.safetensors"), "numpy") as f:
    assert f.get_slice("transformer.h.0.attn.c_attn.weight").get_shape() == [
      64,
      192,
    ]
  back = models.from_pretrained(out)
  np.testing.assert_array_equal(back.model.apply(back.variables, IDS), want)


def test_bert_classifier_folder(tmp_path):
  bert = DATA / "hf" / "bert"
  lm = randomize(
    models.from_pretrained(
      bert, task="classification", num_labels=2, lora={"rank": 2}, quant=NF4
    )
  )
  merged, _ = interop.merge(lm.variables, lm.plan)
  spec = models.ModelSpec(lm.config, "classification", 2)
  raw = json.loads((bert / "config.json").read_text())
  out = interop.write_merged(
    tmp_path,
    merged,
    spec,
    False,
    base=bert,
    raw_config=raw,
    labels={"no": 0, "yes": 1},
  )
  config = json.loads((out / "config.json").read_text())
  assert config["architectures"] == ["BertForSequenceClassification"]
  assert config["id2label"] == {"0": "no", "1": "yes"}
  keys = _keys(out)
  assert "bert.encoder.layer.1.output.dense.weight" in keys
  assert "bert.pooler.dense.weight" in keys  # copied from the base
  with safe_open(str(out / "model.safetensors"), "numpy") as f:
    head = f.get_tensor("classifier.weight")
  np.testing.assert_array_equal(
    head, np.asarray(lm.variables["params"]["classifier"]["kernel"]).T
  )
