"""Bad checkpoints raise errors naming the tensor and the file; other
legitimate layouts (shards, a bare trunk) load."""

import json
import pathlib
import shutil

import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from qlora_jax import models

HF = pathlib.Path(__file__).parent / "data" / "hf"
Q_PROJ = "model.layers.1.self_attn.q_proj.weight"


def _copy(tmp_path, name="llama_gqa", edit=None) -> pathlib.Path:
  """A copy of a fixture whose tensors went through `edit(dict)`."""
  folder = tmp_path / name
  shutil.copytree(HF / name, folder)
  if edit is not None:
    tensors = load_file(folder / "model.safetensors")
    edit(tensors)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
  return folder


def _logits(folder, ids):
  lm = models.from_pretrained(folder)
  return np.asarray(lm.model.apply(lm.variables, ids))


def test_unsupported_model_type(tmp_path):
  folder = _copy(tmp_path)
  cfg = json.loads((folder / "config.json").read_text())
  cfg["model_type"] = "falcon"
  (folder / "config.json").write_text(json.dumps(cfg))
  with pytest.raises(models.ConfigError, match=r"model_type.*'falcon'") as e:
    models.from_pretrained(folder)
  assert str(folder / "config.json") in str(e.value)


def test_unsupported_rope_type(tmp_path):
  folder = _copy(tmp_path)
  cfg = json.loads((folder / "config.json").read_text())
  cfg["rope_parameters"] = {"rope_type": "yarn", "factor": 4.0}
  (folder / "config.json").write_text(json.dumps(cfg))
  with pytest.raises(models.ConfigError, match="rope type 'yarn'"):
    models.from_pretrained(folder)


def test_missing_tensor(tmp_path):
  folder = _copy(tmp_path, edit=lambda t: t.pop(Q_PROJ))
  with pytest.raises(models.CheckpointError, match="missing tensor") as e:
    models.from_pretrained(folder)
  assert repr(Q_PROJ) in str(e.value)
  assert "model.safetensors" in str(e.value)


def test_unexpected_tensor(tmp_path):
  def add(t):
    t["model.layers.0.mlp.extra_proj.weight"] = np.ones((4, 4), np.float32)

  folder = _copy(tmp_path, edit=add)
  with pytest.raises(models.CheckpointError, match="unexpected tensor") as e:
    models.from_pretrained(folder)
  assert "'model.layers.0.mlp.extra_proj.weight'" in str(e.value)
  assert str(folder / "model.safetensors") in str(e.value)


def test_shape_that_disagrees_with_the_config(tmp_path):
  def shrink(t):
    t[Q_PROJ] = t[Q_PROJ][:32]

  folder = _copy(tmp_path, edit=shrink)
  with pytest.raises(models.CheckpointError, match=r"shape \(32, 64\)") as e:
    models.from_pretrained(folder)
  assert repr(Q_PROJ) in str(e.value)
  assert str(folder / "model.safetensors") in str(e.value)


@pytest.mark.parametrize("quant", [None, {"data_type": "nf4"}])
def test_non_finite_weight(tmp_path, quant):
  def poison(t):
    t[Q_PROJ] = t[Q_PROJ].copy()
    t[Q_PROJ][3, 5] = np.nan

  folder = _copy(tmp_path, edit=poison)
  with pytest.raises(models.CheckpointError, match="non-finite") as e:
    models.from_pretrained(folder, quant=quant)
  assert repr(Q_PROJ) in str(e.value) and "(3, 5)" in str(e.value)
  assert str(folder / "model.safetensors") in str(e.value)


def test_folder_without_safetensors(tmp_path):
  folder = _copy(tmp_path)
  (folder / "model.safetensors").unlink()
  with pytest.raises(models.CheckpointError, match="no model.safetensors"):
    models.from_pretrained(folder)


def test_sharded_checkpoint_loads_the_same_model(tmp_path):
  folder = _copy(tmp_path)
  tensors = load_file(folder / "model.safetensors")
  (folder / "model.safetensors").unlink()
  names = sorted(tensors)
  shards = {"model-00001-of-00002.safetensors": names[::2]}
  shards["model-00002-of-00002.safetensors"] = names[1::2]
  weight_map = {}
  for file, keys in shards.items():
    save_file({k: tensors[k] for k in keys}, folder / file)
    weight_map.update({k: file for k in keys})
  index = {"metadata": {}, "weight_map": weight_map}
  (folder / "model.safetensors.index.json").write_text(json.dumps(index))
  ids = np.load(HF / "llama_gqa" / "reference.npz")["input_ids"]
  np.testing.assert_array_equal(
    _logits(folder, ids), _logits(HF / "llama_gqa", ids)
  )
  # An index entry whose shard lacks the tensor is named.
  weight_map[names[0]] = "model-00002-of-00002.safetensors"
  (folder / "model.safetensors.index.json").write_text(json.dumps(index))
  with pytest.raises(models.CheckpointError, match=repr(names[0])):
    models.from_pretrained(folder)


def test_bare_trunk_checkpoint_loads(tmp_path):
  """A LlamaModel-style file (no "model." prefix) plus lm_head."""

  def strip(t):
    for k in list(t):
      t[k.removeprefix("model.")] = t.pop(k)

  folder = _copy(tmp_path, edit=strip)
  ids = np.load(HF / "llama_gqa" / "reference.npz")["input_ids"]
  np.testing.assert_array_equal(
    _logits(folder, ids), _logits(HF / "llama_gqa", ids)
  )


def test_bfloat16_checkpoint_loads(tmp_path):
  """Real checkpoints are mostly bf16: read through ml_dtypes, upcast."""

  def to_bf16(t):
    for k in t:
      t[k] = t[k].astype(ml_dtypes.bfloat16)

  folder = _copy(tmp_path, edit=to_bf16)
  ref = np.load(HF / "llama_gqa" / "reference.npz")
  out = _logits(folder, ref["input_ids"])
  err = np.abs(out - ref["logits"]).max() / np.abs(ref["logits"]).max()
  assert 1e-5 < err < 3e-2  # bf16 rounding of the weights only


def test_task_and_model_must_agree():
  with pytest.raises(ValueError, match="not available for model_type 'llama'"):
    models.from_pretrained(HF / "llama_gqa", task="embedding")
  with pytest.raises(ValueError, match="num_labels"):
    models.from_pretrained(HF / "bert", task="classification")


def test_prefetch_spans_are_the_tensors_bytes():
  """The read-ahead byte range of every tensor (parsed from the header by
  `Checkpoint`) holds exactly that tensor's data as `safetensors` reads it."""
  from qlora_jax.models.safetensors_reader import Checkpoint

  ckpt = Checkpoint(HF / "llama_gqa")
  data = (HF / "llama_gqa" / "model.safetensors").read_bytes()
  for key in ckpt.keys():
    start, length = ckpt._spans[key]
    want = ckpt.read(key)
    assert data[start : start + length] == want.tobytes(), key
    ckpt.prefetch(key)  # a valid range: no error


def test_quantized_and_float_loads_agree_with_the_numpy_rule(tmp_path):
  """The loader casts and quantizes in XLA: the stored codes and scales equal
  those of the quantizer given the bfloat16 weight rounded in NumPy (one
  layer, exact), and a float32 checkpoint loaded into a bfloat16 base holds
  the same values as NumPy's round-to-nearest-even."""
  from qlora_jax import quant

  lm = models.from_pretrained(
    HF / "llama_gqa",
    quant={"data_type": "nf4", "block_size": 64, "double_quant": True},
    base_dtype="bfloat16",
  )
  w = load_file(HF / "llama_gqa" / "model.safetensors")[Q_PROJ]
  ref = quant.quantize(w.astype(ml_dtypes.bfloat16), "nf4", 64, True)
  got = lm.variables["base"]["model"]["layers_1"]["self_attn"]["q_proj"]
  got = got["weight"]
  for part in ("codes", "absmax", "absmax2", "offset"):
    np.testing.assert_array_equal(
      np.asarray(getattr(got, part)), np.asarray(getattr(ref, part))
    )
  lm = models.from_pretrained(HF / "llama_gqa", base_dtype="bfloat16")
  got = lm.variables["base"]["model"]["layers_1"]["self_attn"]["q_proj"]
  np.testing.assert_array_equal(
    np.asarray(got["weight"]).view(np.uint16),
    w.astype(ml_dtypes.bfloat16).view(np.uint16),
  )


def test_a_new_head_is_what_the_models_own_initialisers_give():
  # The loader initialises what the checkpoint lacks (a classification
  # head) in one jitted apply that keeps only those variables: exactly the
  # values of the model's apply run op by op with the same key.
  import jax  # noqa: PLC0415

  from qlora_jax import nn as qnn  # noqa: PLC0415
  from qlora_jax.models import pretrained  # noqa: PLC0415

  lm = models.from_pretrained(
    HF / "bert", task="classification", num_labels=3, lora={"rank": 2}
  )
  flat = qnn.flatten(lm.variables)
  new = [p for p in flat if "classifier" in "/".join(p)]
  assert new, sorted("/".join(p) for p in flat)
  loaded = {p: v for p, v in flat.items() if p not in new}
  key = jax.random.fold_in(jax.random.key(0), 1 << 30)
  spec = models.ModelSpec(lm.config, "classification", 3)
  _, eager = lm.model.apply(
    qnn.unflatten(loaded),
    *spec.dummy_inputs(),
    rngs={"params": key},
    mutable=[qnn.PARAMS],
  )
  eager = qnn.flatten(eager)
  got = pretrained._new_variables(lm.model, spec, loaded, key)
  assert sorted(got) == sorted(new)
  for p in new:
    np.testing.assert_array_equal(got[p], eager[p])
    np.testing.assert_array_equal(flat[p], eager[p])
