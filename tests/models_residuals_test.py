"""What the backward pass of a decoder block keeps, and that keeping less
changes no value or gradient.

A scan over layers stacks every array a block keeps for its backward pass
(one per layer), so each kept copy is written and read back once per
layer and step. The references here are the same expressions
differentiated op by op.
"""

import contextlib
import io
import re

import jax
import jax.ad_checkpoint
import jax.numpy as jnp
import numpy as np
import pytest

from qlora_jax import models
from qlora_jax import nn as qnn
from qlora_jax.models.activations import ACTIVATIONS, gated
from qlora_jax.models.attention import masked_softmax


@pytest.mark.parametrize("name", ["silu", "gelu"])
def test_gated_gives_the_products_value_and_gradients(name):
  act = ACTIVATIONS[name]
  rng = np.random.default_rng(0)
  g, u, w = (
    jnp.asarray(rng.standard_normal((6, 10)), jnp.float32) for _ in "guw"
  )

  def ours(g, u):
    return jnp.sum(gated(act, g, u) * w)

  def reference(g, u):
    return jnp.sum(act(g) * u * w)

  np.testing.assert_array_equal(gated(act, g, u), act(g) * u)
  ours_grads = jax.grad(ours, (0, 1))(g, u)
  reference_grads = jax.grad(reference, (0, 1))(g, u)
  for a, b in zip(ours_grads, reference_grads, strict=True):
    # Recomputing act(g) in the backward pass can fuse differently: 1e-6.
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def _op_by_op_softmax(scores, mask):
  b, hkv, g, lq, lk = scores.shape
  s = jnp.where(mask[:, None, None], scores, jnp.finfo(jnp.float32).min)
  return jax.nn.softmax(s, axis=-1).reshape(b, hkv, g * lq, lk)


def test_masked_softmax_matches_the_op_by_op_softmax_and_its_gradient():
  rng = np.random.default_rng(1)
  b, hkv, g, lq, lk = 2, 3, 2, 5, 5
  scores = jnp.asarray(rng.standard_normal((b, hkv, g, lq, lk)), jnp.float32)
  mask = np.tril(np.ones((lq, lk), bool))[None].repeat(b, 0)
  mask[1, 2] = False  # a query that sees no key at all
  mask = jnp.asarray(mask)
  cot = jnp.asarray(rng.standard_normal((b, hkv, g * lq, lk)), jnp.float32)

  ours, vjp = jax.vjp(lambda s: masked_softmax(s, mask), scores)
  ref, ref_vjp = jax.vjp(lambda s: _op_by_op_softmax(s, mask), scores)
  np.testing.assert_array_equal(ours, ref)
  (d,), (d_ref,) = vjp(cot), ref_vjp(cot)
  # The gradient is y * (dy - sum(dy * y)) either way, summed in another
  # order (float32; gradients here are of order 0.1-1): 1e-5 relative,
  # 1e-6 absolute.
  np.testing.assert_allclose(d, d_ref, rtol=1e-5, atol=1e-6)
  hidden = ~np.broadcast_to(mask[:, None, None], (b, hkv, g, lq, lk))
  assert np.all(np.asarray(d).reshape(hidden.shape)[hidden] == 0)


def _kept_shapes(fn, *args) -> list[tuple[int, ...]]:
  out = io.StringIO()
  with contextlib.redirect_stdout(out):
    jax.ad_checkpoint.print_saved_residuals(fn, *args)
  shapes = []
  for line in out.getvalue().splitlines():
    m = re.match(r"\s*\w+\[([\d,]*)\]", line)
    assert m, line
    shapes.append(tuple(int(s) for s in m.group(1).split(",") if s))
  return shapes


@pytest.mark.parametrize("scan_layers", [False, True])
def test_a_llama_block_keeps_each_large_activation_once(scan_layers):
  """Batch 2 x 6 tokens (T = 12), hidden 32, MLP 96, 4 query / 2 key-value
  heads of 8 (G = 2), 2 layers, LoRA r=4 on every linear layer. Per layer
  the backward pass needs gate(x), up(x) and their product (the input of
  down_proj's adapter), [T, 96] each, and the attention probabilities
  [2, 2, G * 6, 6] once; it keeps nothing of the 5-D score layout."""
  cfg = {
    "model_type": "llama",
    "vocab_size": 64,
    "hidden_size": 32,
    "intermediate_size": 96,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 64,
    "rms_norm_eps": 1e-5,
    "tie_word_embeddings": False,
  }
  lm = models.init_random(
    cfg,
    task="causal_lm",
    lora={"rank": 4, "alpha": 8.0, "dropout": 0.0},
    scan_layers=scan_layers,
  )
  trainable, frozen = qnn.split_trainable(lm.variables, [])
  ids = jnp.ones((2, 6), jnp.int32)

  def loss(p):
    return lm.model.apply(qnn.merge_trees(p, frozen), ids).sum()

  shapes = _kept_shapes(loss, trainable)
  # Unscanned, each of the 2 layers keeps its own arrays; a scan keeps
  # one array per kind, stacked over the layers.
  copies = 1 if scan_layers else 2
  lead = (2,) if scan_layers else ()
  assert shapes.count((*lead, 12, 96)) == 3 * copies, shapes
  assert shapes.count((*lead, 2, 2, 12, 6)) == copies, shapes
  assert not any(len(s) >= 5 + scan_layers for s in shapes), shapes
