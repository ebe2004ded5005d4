"""Quantize-on-load, adapters on load, scanned stacking, `place`, random
init and new heads."""

import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qlora_jax import models, quant
from qlora_jax import nn as qnn

HF = pathlib.Path(__file__).parent / "data" / "hf"
IDS = np.load(HF / "llama_gqa" / "reference.npz")["input_ids"]
NF4 = {"data_type": "nf4", "block_size": 64, "double_quant": True}
LORA = {"rank": 4, "alpha": 8}


def _dequantized(variables):
  """The same variables with every quantized weight as float32."""
  return jax.tree.map(
    lambda x: (
      quant.dequantize(x, jnp.float32)
      if isinstance(x, quant.QuantizedTensor)
      else x
    ),
    variables,
    is_leaf=lambda x: isinstance(x, quant.QuantizedTensor),
  )


def test_nf4_with_lora_starts_at_the_dequantized_base():
  lm = models.from_pretrained(HF / "llama_gqa", lora=LORA, quant=NF4)
  base = qnn.flatten(lm.variables["base"])
  weights = {p: w for p, w in base.items() if p[-1] == "weight"}
  assert len(weights) == 15
  for path, w in weights.items():
    is_head = path == ("lm_head", "weight")
    assert isinstance(w, quant.QuantizedTensor) != is_head, path
    if not is_head:
      assert w.spec == quant.QuantSpec("nf4", 64, True)
  assert lm.plan.lookup("lm_head") == qnn.LayerSpec()
  assert len(lm.plan.lora_paths()) == 14
  # B = 0 at init: the output is the dequantized float model's, up to
  # float32 summation order (the quantized matmul is jitted on its own).
  float_model = models.from_pretrained(HF / "llama_gqa").model
  out = jax.jit(lm.model.apply)(lm.variables, IDS)
  ref = float_model.apply({"base": _dequantized(lm.variables)["base"]}, IDS)
  np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)
  s = lm.stats
  assert s.linear_stored_bytes < 0.3 * s.linear_float32_bytes
  assert s.peak_rss_bytes >= s.peak_rss_before_bytes > 0


def test_adapter_init_is_seeded():
  a = models.from_pretrained(HF / "llama_gqa", lora=LORA, seed=1)
  b = models.from_pretrained(HF / "llama_gqa", lora=LORA, seed=1)
  c = models.from_pretrained(HF / "llama_gqa", lora=LORA, seed=2)
  path = ("model", "layers_0", "self_attn", "q_proj", "lora_a")
  pa, pb, pc = (qnn.flatten(m.variables["params"])[path] for m in (a, b, c))
  np.testing.assert_array_equal(pa, pb)
  assert not np.array_equal(pa, pc)


def test_pissa_on_load_keeps_the_function():
  """PiSSA moves the top singular directions into the adapter: the
  residual base plus the adapter is the original weight."""
  plain = models.from_pretrained(HF / "llama_gqa")
  pissa = models.from_pretrained(
    HF / "llama_gqa", lora=dict(LORA, init="pissa")
  )
  w = plain.variables["base"]["model"]["layers_0"]["mlp"]["up_proj"]["weight"]
  r = pissa.variables["base"]["model"]["layers_0"]["mlp"]["up_proj"]["weight"]
  assert np.abs(np.asarray(w) - np.asarray(r)).max() > 0.1
  np.testing.assert_allclose(
    pissa.model.apply(pissa.variables, IDS),
    plain.model.apply(plain.variables, IDS),
    rtol=1e-4,
    atol=1e-4,
  )


def test_scanned_quantized_model_stacks_each_layers_quantization():
  plain = models.from_pretrained(HF / "llama_gqa", quant=NF4)
  scanned = models.from_pretrained(
    HF / "llama_gqa", quant=NF4, scan_layers=True
  )
  stacked = scanned.variables["base"]["model"]["layers"]["mlp"]["down_proj"]
  stacked = stacked["weight"]
  assert stacked.shape == (64, 160) and stacked.codes.shape[0] == 2
  for i in range(2):
    one = plain.variables["base"]["model"][f"layers_{i}"]["mlp"]["down_proj"]
    for got, want in zip(
      jax.tree.leaves(stacked), jax.tree.leaves(one["weight"]), strict=True
    ):
      np.testing.assert_array_equal(got[i], want)
  np.testing.assert_allclose(
    jax.jit(scanned.model.apply)(scanned.variables, IDS),
    jax.jit(plain.model.apply)(plain.variables, IDS),
    rtol=1e-5,
    atol=1e-5,
  )


@pytest.mark.parametrize("scan_layers", [False, True])
def test_place_sees_every_variable_once(scan_layers):
  seen = []

  def place(path, leaf):
    seen.append(path)
    return jax.tree.map(jnp.asarray, leaf)

  lm = models.from_pretrained(
    HF / "llama_gqa",
    lora=LORA,
    quant=NF4,
    scan_layers=scan_layers,
    place=place,
  )
  paths = ["/".join(p) for p in qnn.flatten(lm.variables)]
  assert sorted(seen) == sorted(paths)
  if scan_layers:
    assert "base/model/layers/self_attn/q_proj/weight" in seen
    assert "params/model/layers/self_attn/q_proj/lora_a" in seen


def test_init_random_llama_shaped_model_with_scan():
  config = dict(
    model_type="llama",
    vocab_size=128,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
  )
  seen = []

  def place(path, leaf):
    seen.append(path)
    return leaf

  lm = models.init_random(
    config, lora=LORA, quant=NF4, scan_layers=True, remat=True, place=place
  )
  assert sorted(seen) == sorted("/".join(p) for p in qnn.flatten(lm.variables))
  q = lm.variables["base"]["model"]["layers"]["self_attn"]["q_proj"]["weight"]
  assert isinstance(q, quant.QuantizedTensor) and q.codes.shape[0] == 3
  a = lm.variables["params"]["model"]["layers"]["self_attn"]["q_proj"]
  assert a["lora_a"].shape == (3, 64, 4)
  logits = jax.jit(lm.model.apply)(lm.variables, jnp.ones((2, 5), jnp.int32))
  assert logits.shape == (2, 5, 128) and logits.dtype == jnp.float32


def test_classification_head_trains_with_dropout_under_scan_and_remat():
  """A new float32 `classifier` in "params"; deterministic=False draws
  dropout masks from the "dropout" rng (per layer under nn.scan) and the
  gradient flows through nn.remat to the head and every adapter."""
  clf = models.from_pretrained(
    HF / "bert",
    task="classification",
    num_labels=3,
    lora=dict(LORA, dropout=0.1),
    quant=NF4,
    scan_layers=True,
    remat=True,
  )
  head = clf.variables["params"]["classifier"]
  assert head["kernel"].shape == (64, 3) and head["kernel"].dtype == jnp.float32
  assert "classifier" not in clf.variables["base"]
  enc = qnn.flatten(clf.variables["base"]["bert"])
  assert ("encoder", "layer", "attention", "self", "query", "weight") in enc
  trainable, frozen = qnn.split_trainable(clf.variables)
  ids = jnp.asarray(np.load(HF / "bert" / "reference.npz")["input_ids"])
  segments = (ids != 0).astype(jnp.int32)

  def loss(p, key):
    logits = clf.model.apply(
      qnn.merge_trees(p, frozen),
      ids,
      segments,
      deterministic=False,
      rngs={"dropout": key},
    )
    return -jax.nn.log_softmax(logits)[:, 0].mean()

  step = jax.jit(jax.value_and_grad(loss))
  (l1, grads), (l2, _), (l3, _) = (
    step(trainable, jax.random.key(k)) for k in (1, 1, 2)
  )
  assert float(l1) == float(l2) != float(l3)
  grads = qnn.flatten(grads)
  assert np.abs(grads[("params", "classifier", "kernel")]).max() > 0
  lora_b = {p: g for p, g in grads.items() if p[-1] == "lora_b"}
  assert len(lora_b) == 6  # stacked over the 2 layers
  for path, g in lora_b.items():
    assert all(np.abs(g[i]).max() > 0 for i in range(2)), path


def test_bfloat16_compute_and_storage_stay_close_to_float32():
  ref = np.load(HF / "llama_gqa" / "reference.npz")["logits"]
  lm = models.from_pretrained(
    HF / "llama_gqa", dtype=jnp.bfloat16, base_dtype=jnp.bfloat16
  )
  emb = lm.variables["base"]["model"]["embed_tokens"]["embedding"]
  assert emb.dtype == jnp.bfloat16
  out = np.asarray(lm.model.apply(lm.variables, IDS))
  assert out.dtype == np.float32
  err = np.abs(out - ref).max() / np.abs(ref).max()
  print(f"bf16 max rel error {err:.2e}")
  assert err < 3e-2
