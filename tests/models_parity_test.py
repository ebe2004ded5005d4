"""Models vs transformers: outputs of tiny random checkpoints.

Reference: tests/data/hf/*/reference.npz, written by transformers 5.24 (f32,
eager attention) with tests/fixtures/make_hf_fixtures.py. Tolerance: the
max-norm relative error max|ours - ref| / max|ref| <= 1e-4 (quantization
off, float32 compute).
"""

import pathlib
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qlora_jax import models
from qlora_jax import nn as qnn

HF = pathlib.Path(__file__).parent / "data" / "hf"
DECODERS = ["llama_gqa", "llama_tied", "qwen2", "gpt2"]
TOL = 1e-4


def _rel_error(ours, ref) -> float:
  return float(np.abs(np.asarray(ours) - ref).max() / np.abs(ref).max())


def _decoder_error(folder, **kw) -> float:
  ref = np.load(folder / "reference.npz")
  lm = models.from_pretrained(folder, **kw)
  return _rel_error(
    lm.model.apply(lm.variables, ref["input_ids"]), ref["logits"]
  )


@pytest.mark.parametrize("name", DECODERS)
def test_decoder_logits_match_transformers(name):
  err = _decoder_error(HF / name)
  print(f"{name}: max rel error {err:.2e}")
  assert err <= TOL


@pytest.mark.parametrize("name", ["llama_gqa", "gpt2"])
def test_scanned_rematerialised_decoder_matches_transformers(name):
  err = _decoder_error(HF / name, scan_layers=True, remat=True)
  print(f"{name} scan+remat: max rel error {err:.2e}")
  assert err <= TOL


def _bert_hidden(scan_layers=False):
  ref = np.load(HF / "bert" / "reference.npz")
  enc = models.from_pretrained(
    HF / "bert", task="embedding", scan_layers=scan_layers
  )
  hidden = enc.model.apply(
    enc.variables,
    ref["input_ids"],
    ref["attention_mask"],
    token_type_ids=ref["token_type_ids"],
    method="hidden_states",
  )
  return hidden, ref


@pytest.mark.parametrize("scan_layers", [False, True])
def test_bert_last_hidden_state_matches_transformers(scan_layers):
  hidden, ref = _bert_hidden(scan_layers)
  # transformers computes padding positions too (they attend to the real
  # tokens), so every position is compared.
  err = _rel_error(hidden, ref["last_hidden_state"])
  print(f"bert scan={scan_layers}: max rel error {err:.2e}")
  assert err <= TOL


def test_transformers4_config_layout_gives_the_same_model(tmp_path):
  """config_v4.json: top-level rope_theta and a rope_scaling dict."""
  folder = tmp_path / "llama_v4"
  shutil.copytree(HF / "llama_gqa", folder)
  shutil.copy(folder / "config_v4.json", folder / "config.json")
  v4 = models.read_config(folder / "config.json")
  v5 = models.read_config(HF / "llama_gqa" / "config.json")
  assert v4 == v5
  assert v4.rope.type == "llama3" and v4.rope.original_max_positions == 16


def _stacked(flat_params: dict, num_layers: int) -> dict:
  """Unscanned {(params, model, layers_i, ...): x} -> scanned layout."""
  out = {}
  for path in flat_params:
    if path[2] == "layers_0":
      rest = path[3:]
      layers = [
        flat_params[(*path[:2], f"layers_{i}", *rest)]
        for i in range(num_layers)
      ]
      out[(*path[:2], "layers", *rest)] = jnp.stack(layers)
  return qnn.unflatten(out)


def test_scan_and_remat_give_the_unscanned_gradients():
  """Backward through nn.scan + nn.remat equals the plain model's."""
  ref = np.load(HF / "llama_gqa" / "reference.npz")
  ids = jnp.asarray(ref["input_ids"])
  lora = {"rank": 2}
  plain = models.from_pretrained(HF / "llama_gqa", lora=lora)
  scanned = models.from_pretrained(
    HF / "llama_gqa", lora=lora, scan_layers=True, remat=True
  )
  params, frozen = qnn.split_trainable(plain.variables)
  # B != 0 so that gradients reach lora_a too.
  params = jax.tree.map(lambda p: p + 0.01, params)
  scanned_params = _stacked(qnn.flatten(params), 2)
  _, scanned_frozen = qnn.split_trainable(scanned.variables)

  def grad(lm, p, frozen):
    def loss(p):
      return jnp.mean(lm.model.apply(qnn.merge_trees(p, frozen), ids) ** 2)

    return qnn.flatten(jax.jit(jax.grad(loss))(p))

  g_plain = grad(plain, params, frozen)
  g_scanned = grad(scanned, scanned_params, scanned_frozen)
  assert len(g_plain) == 2 * 7 * 2  # (a, b) x 7 layers x 2 blocks
  for path, g in g_plain.items():
    assert np.abs(g).max() > 0, path
    layer = int(path[2].split("_")[1])
    stacked = g_scanned[(*path[:2], "layers", *path[3:])][layer]
    scale = np.abs(g).max()
    np.testing.assert_allclose(stacked, g, rtol=1e-4, atol=1e-5 * scale)
