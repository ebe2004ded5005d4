"""The asymmetric int<k>_asym format (GGML Q4_1), QA-LoRA and its exact merge.

References: the `gguf` package's own NumPy Q4_1 / Q5_1 quantizer and
dequantizer (bit for bit), the quantization rule restated in NumPy below
for other widths, dense float32 matmuls of the dequantized weight, and the
float merge of the same adapters. Tolerances are stated where used.
"""

import dataclasses
import json
import pathlib

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
from gguf import GGMLQuantizationType as Q

from qlora_jax import interop, models, quant
from qlora_jax import nn as qnn
from qlora_jax.engine.settings import ConfigError, Settings
from qlora_jax.interop import gguf_export, hf_export, naming
from qlora_jax.models import gguf_q4_1
from qlora_jax.nn import matmul
from qlora_jax.quant import packing
from tests import tiny_config
from tests.interop_helpers import IDS, randomize, rel_error
from tests.models_gguf_test import hf_tensors, write_gguf

LLAMA = pathlib.Path(__file__).parent / "data" / "hf" / "llama_gqa"
Q4_1 = {"data_type": "int4_asym", "block_size": 32, "double_quant": False}
QA = {"rank": 4, "alpha": 8, "qa": True}


def _matrix(seed=0, shape=(48, 96)):
  rng = np.random.default_rng(seed)
  x = rng.standard_normal(shape) * rng.uniform(0.01, 3, (shape[0], 1))
  x = x.astype(np.float32)
  x[3, :32] = 0.7  # a constant block: d = 0, every code 0
  return x


def _codes(qt):
  bits = quant.get_data_type(qt.data_type).bits
  return np.asarray(packing.unpack(qt.codes, bits, qt.size))


@pytest.mark.parametrize("qtype,bits", [(Q.Q4_1, 4), (Q.Q5_1, 5)])
def test_blocks_of_32_are_the_gguf_quantizer_bit_for_bit(qtype, bits):
  x = _matrix()
  ref = gguf.quants.quantize(x, qtype).reshape(x.size // 32, -1)
  qt = quant.quantize(x, f"int{bits}_asym", 32)
  d = ref[:, 0:2].copy().view(np.uint16).reshape(-1)
  m = ref[:, 2:4].copy().view(np.uint16).reshape(-1)
  np.testing.assert_array_equal(np.asarray(qt.absmax).view(np.uint16), d)
  np.testing.assert_array_equal(np.asarray(qt.minimum).view(np.uint16), m)
  want = gguf.quants.dequantize(ref.reshape(x.shape[0], -1), qtype)
  np.testing.assert_array_equal(np.asarray(quant.dequantize(qt)), want)
  if qtype == Q.Q4_1:  # and the codes themselves, from the Q4_1 bytes
    raw = ref.reshape(x.shape[0], -1)
    back = gguf_q4_1.q4_1_to_quantized(raw, x.shape, "x")
    np.testing.assert_array_equal(_codes(back), _codes(qt))
    np.testing.assert_array_equal(gguf_q4_1.quantized_to_q4_1(qt), raw)


@pytest.mark.parametrize("bits,block", [(2, 64), (3, 32), (8, 128)])
def test_other_widths_follow_the_rule(bits, block):
  x = _matrix(1, (16, 256))
  qt = quant.quantize(x, f"int{bits}_asym", block)
  xb = x.reshape(-1, block)
  low, top = xb.min(1, keepdims=True), xb.max(1, keepdims=True)
  d = (top - low) / np.float32(2**bits - 1)
  with np.errstate(divide="ignore"):
    inv = np.where(d == 0, 0, np.float32(1) / d).astype(np.float32)
  q = np.trunc((xb - low) * inv + np.float32(0.5)).clip(0, 2**bits - 1)
  np.testing.assert_array_equal(_codes(qt), q.reshape(-1))
  d16, m16 = d.astype(np.float16), low.astype(np.float16)
  want = d16.astype(np.float32) * q + m16.astype(np.float32)
  np.testing.assert_array_equal(
    np.asarray(quant.dequantize(qt)), want.reshape(x.shape)
  )
  # Storage: k bits per code plus a float16 d and m per block.
  report = quant.memory_report(qt)
  assert report.bits_per_param == bits + 32 / block
  assert quant.expected_bits_per_param(qt.spec) == bits + 32 / block


def test_bad_options_are_refused():
  with pytest.raises(ValueError, match="double_quant"):
    quant.QuantSpec("int4_asym", 32, True)
  with pytest.raises(ValueError, match="unknown data type 'nf4_asym'"):
    quant.get_data_type("nf4_asym")


@pytest.mark.parametrize("data_type", ["int4_asym", "int3_asym"])
def test_matmul_and_its_input_gradient_equal_the_dense_ones(data_type):
  # int4: the chunked planar path; int3: codes cross bytes, whole weight.
  w, x = _matrix(2, (48, 64)), _matrix(3, (5, 64))
  qt = quant.quantize(w, data_type, 32)
  dense = np.asarray(quant.dequantize(qt))
  y = matmul.frozen_matmul(jnp.asarray(x), qt, jnp.float32, "xla")
  assert rel_error(y, x @ dense.T) <= 1e-6  # max-norm, float32 sums

  def loss(x):
    return (matmul.frozen_matmul(x, qt, jnp.float32, "xla") ** 2).sum()

  grad = jax.grad(loss)(jnp.asarray(x))
  assert rel_error(grad, 2 * (x @ dense.T) @ dense) <= 1e-6


@pytest.fixture(scope="module")
def qa_llama():
  return randomize(models.from_pretrained(LLAMA, lora=QA, quant=Q4_1))


def test_qa_adapter_acts_on_block_means(qa_llama):
  flat = qnn.flatten(qa_llama.variables)
  prefix = ("model", "layers_0", "mlp", "down_proj")
  a = flat[(qnn.PARAMS, *prefix, "lora_a")]
  assert a.shape == (160 // 32, 4)  # [in / L, r]
  # The layer's update is the LoRA update of A repeated over each block / L.
  w = flat[(qnn.BASE, *prefix, "weight")]
  b = flat[(qnn.PARAMS, *prefix, "lora_b")]
  x = jnp.asarray(_matrix(4, (5, 160)))
  # The layer alone, at the root (path ""), with the model's spec.
  plan = qnn.Plan((("", qa_llama.plan.lookup("/".join(prefix))),))
  scope = {qnn.BASE: {"weight": w}, qnn.PARAMS: {"lora_a": a, "lora_b": b}}
  y = qnn.QLoRADense(64, plan=plan, dtype=jnp.float32).apply(scope, x)
  full = np.repeat(np.asarray(a), 32, axis=0) / 32
  dense = np.asarray(quant.dequantize(w)) + 2.0 * (full @ np.asarray(b)).T
  np.testing.assert_allclose(y, x @ dense.T, rtol=1e-5, atol=1e-5)


def test_exact_merge_keeps_codes_and_scales_and_the_outputs(qa_llama):
  adapted = np.asarray(qa_llama.model.apply(qa_llama.variables, IDS))
  merged, plan = interop.merge(qa_llama.variables, qa_llama.plan, True)
  ours = interop.merged_model(qa_llama.model, plan).apply(merged, IDS)
  before, after = qnn.flatten(qa_llama.variables), qnn.flatten(merged)
  changed = 0
  for path in qa_llama.plan.lora_paths():
    key = (qnn.BASE, *path.split("/"), "weight")
    old, new = before[key], after[key]
    np.testing.assert_array_equal(new.codes, old.codes)
    np.testing.assert_array_equal(new.absmax, old.absmax)
    assert new.minimum.dtype == jnp.float32
    changed += int(np.any(np.asarray(new.minimum) != np.asarray(old.minimum)))
  assert changed == len(qa_llama.plan.lora_paths())
  # Float rounding of m' and of d * q + m' only (see nn.merge): 1e-5.
  err = rel_error(ours, adapted)
  print(f"QA-LoRA exact merge vs adapter on base: {err:.2e}")
  assert err <= 1e-5
  # And the adapters matter (a test that can fail): B = 0 gives the base.
  zero_b = {
    k: (jnp.zeros_like(v) if k[-1] == "lora_b" else v)
    for k, v in before.items()
  }
  plain = qa_llama.model.apply(qnn.unflatten(zero_b), IDS)
  assert rel_error(plain, adapted) > 1e-2


def test_peft_export_is_the_repeated_a(qa_llama, tmp_path):
  trainable, _ = qnn.split_trainable(qa_llama.variables)
  spec = models.ModelSpec(qa_llama.config, "causal_lm")
  interop.write_adapter(tmp_path, trainable, qa_llama.plan, spec, False, "")
  adapter = safetensors.numpy.load_file(tmp_path / "adapter_model.safetensors")
  key = "base_model.model.model.layers.1.self_attn.o_proj.lora_A.weight"
  a = qnn.flatten(trainable)[
    (qnn.PARAMS, "model", "layers_1", "self_attn", "o_proj", "lora_a")
  ]
  want = (np.repeat(np.asarray(a), 32, axis=0) / 32).T  # [r, in]
  np.testing.assert_array_equal(adapter[key], want)


def test_bad_qa_layers_name_the_layer():
  w = jnp.asarray(_matrix(5, (8, 48)))
  lora = qnn.LoraSpec(rank=2, qa=True)
  nf4 = quant.QuantSpec("nf4", 32, True)
  with pytest.raises(ValueError, match="lora qa of blk/q.*asymmetric"):
    qnn.init_adapter(jax.random.key(0), w, lora, nf4, name="blk/q")
  asym = quant.QuantSpec("int4_asym", 32, False)
  with pytest.raises(ValueError, match="blocks of 32 do not divide its 48"):
    qnn.init_adapter(jax.random.key(0), w, lora, asym, name="blk/q")
  with pytest.raises(ValueError, match="no dora"):
    qnn.LoraSpec(rank=2, qa=True, dora=True)


def test_bad_qa_configs_name_the_field():
  config = tiny_config.get_config("/data")
  config.lora.qa = True  # over the default nf4 + double quantization
  with pytest.raises(ConfigError, match="lora.qa: QA-LoRA folds"):
    Settings.from_config(config)
  config.quant.data_type = "int4_asym"  # double_quant still True
  with pytest.raises(ConfigError, match="quant.double_quant: data type"):
    Settings.from_config(config)
  config.quant.double_quant = False
  assert Settings.from_config(config).lora.qa
  # The shipped QA-LoRA config is this one over SmolLM2's Q4_1.
  from configs import qa_lora  # noqa: PLC0415

  settings = Settings.from_config(qa_lora.get_config())
  assert settings.quant.data_type == "int4_asym" and settings.lora.qa
  assert settings.quant.block_size == 32 and not settings.quant.double_quant


def _all_q4_1(key: str) -> Q:
  return Q.F32 if key.endswith("norm.weight") else Q.Q4_1


@pytest.fixture(scope="module")
def q4_1_gguf(tmp_path_factory):
  path = tmp_path_factory.mktemp("q41") / "base.gguf"
  return write_gguf(path, hf_tensors("llama", False, seed=6), kind_of=_all_q4_1)


def test_q4_1_matrices_load_as_stored(q4_1_gguf):
  lm = models.from_pretrained(q4_1_gguf, quant=Q4_1)
  ckpt = models.GGUFCheckpoint(q4_1_gguf)
  flat = qnn.flatten(lm.variables)
  key = "model.layers.1.self_attn.k_proj.weight"  # permuted rows
  qt = flat[(qnn.BASE, "model", "layers_1", "self_attn", "k_proj", "weight")]
  np.testing.assert_array_equal(
    np.asarray(quant.dequantize(qt)), ckpt.read(key)
  )
  # As stored: 4-bit codes, float16 d and m per block of 32 (5 bits).
  assert qt.minimum.dtype == jnp.float16
  assert quant.memory_report(qt).bits_per_param == 5.0


def test_qa_run_exports_q4_1_with_its_codes(q4_1_gguf, tmp_path):
  lm = randomize(models.from_pretrained(q4_1_gguf, lora=QA, quant=Q4_1))
  adapted = np.asarray(lm.model.apply(lm.variables, IDS))
  merged, plan = interop.merge(lm.variables, lm.plan, True)
  names = naming.Names(models.ModelSpec(lm.config, "causal_lm"), False)
  tensors, _, _ = hf_export.merged_tensors(merged, names, "float32", False)
  out = gguf_export.write_gguf(tmp_path / "qa.gguf", tensors, q4_1_gguf)
  base, new = models.read_gguf(q4_1_gguf), models.read_gguf(out)
  assert new.metadata["general.file_type"] == 3  # MOSTLY_Q4_1
  name = "blk.0.ffn_up.weight"
  assert new.tensors[name].qtype == Q.Q4_1
  old_bytes = _bytes(q4_1_gguf, base.tensors[name])
  new_bytes = _bytes(out, new.tensors[name])
  # Codes and scales d untouched; only the minimums m moved.
  np.testing.assert_array_equal(new_bytes[:, 4:], old_bytes[:, 4:])
  np.testing.assert_array_equal(new_bytes[:, :2], old_bytes[:, :2])
  assert np.any(new_bytes[:, 2:4] != old_bytes[:, 2:4])
  back = models.from_pretrained(out, quant=Q4_1)
  got = np.asarray(back.model.apply(back.variables, IDS))
  # What Q4_1 can hold: the exact merge with m' rounded to float16, the
  # format's type (2**-11 of |m'| per weight); the rest is as trained.
  flat = qnn.flatten(merged)
  for key, leaf in flat.items():
    if isinstance(leaf, quant.QuantizedTensor):
      m16 = leaf.minimum.astype(jnp.float16)
      flat[key] = dataclasses.replace(leaf, minimum=m16)
  model = interop.merged_model(lm.model, plan)
  want = np.asarray(model.apply(qnn.unflatten(flat), IDS))
  assert rel_error(got, want) <= 1e-6  # float32 sums in another order
  print(
    "QA-LoRA Q4_1 GGUF read back vs adapter on base (random adapters of "
    f"0.1 N(0, 1)): {rel_error(got, adapted):.2e}"
  )


def _bytes(path, info) -> np.ndarray:
  raw = np.fromfile(path, np.uint8, info.nbytes, offset=info.offset)
  return raw.reshape(-1, 20)


def test_runs_recorded_before_lora_qa_still_read(tmp_path):
  # A config.json written before the field existed reads as qa = False,
  # and resuming that workdir with today's config sees no difference.
  from qlora_jax.engine import restore, workdir  # noqa: PLC0415

  config = Settings.from_config(tiny_config.get_config(str(tmp_path)))
  old = config.to_dict()
  del old["lora"]["qa"]
  (tmp_path / "config.json").write_text(json.dumps(old))
  assert restore.read_settings(tmp_path) == config
  workdir.check_config(tmp_path, config.to_dict(), allow_safe_changes=False)
  # A new config must still name the field.
  with pytest.raises(ConfigError, match="lora.qa: missing from the config"):
    Settings.from_config(old)
