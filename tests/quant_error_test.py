"""quant_error: weight and output error of data types on a checkpoint."""

import jax.numpy as jnp
import numpy as np
import pytest

from qlora_jax import models, quant
from qlora_jax.ablations import quant_error

BERT = "tests/data/hf/bert"
LLAMA = "tests/data/hf/llama_gqa"
TEXTS = ["the of and to in is", "was for on that with as by at from it"]


@pytest.mark.parametrize("checkpoint", [BERT, LLAMA])
def test_errors_fall_with_bits_and_match_direct_computation(checkpoint):
  settings = [
    quant_error.Setting("nf2", 64, False),
    quant_error.Setting("nf8", 64, True),
  ]
  out = quant_error.measure(checkpoint, settings, TEXTS)
  low, high = out["nf2-b64"], out["nf8+dq-b64"]
  assert high["weight_relative_error"] < low["weight_relative_error"]
  # Bits per parameter by formula, exact: per layer of n weights in blocks
  # of 64, the codes (k bits each), then one float32 absmax per block, or
  # (double quant) one 8-bit code per block, a float32 absmax per 256
  # blocks and one float32 offset.
  lm = models.from_pretrained(
    checkpoint, task="embedding" if checkpoint == BERT else "causal_lm"
  )
  weights = quant_error.linear_weights(lm.variables)
  sizes = [int(w.size) for p, w in weights.items() if p in low["layers"]]
  blocks = [-(-n // 64) for n in sizes]
  nf2 = sum(2 * n + 32 * b for n, b in zip(sizes, blocks, strict=True))
  nf8 = sum(
    8 * n + 8 * b + 32 * -(-b // 256) + 32
    for n, b in zip(sizes, blocks, strict=True)
  )
  assert low["bits_per_param"] == pytest.approx(nf2 / sum(sizes), rel=1e-12)
  assert high["bits_per_param"] == pytest.approx(nf8 / sum(sizes), rel=1e-12)
  if checkpoint == BERT:
    assert high["embedding_cosine"] > low["embedding_cosine"]
    assert high["embedding_cosine"] > 0.99
  else:
    assert high["kl_divergence"] < low["kl_divergence"]
    assert high["top1_agreement"] >= low["top1_agreement"]
  # One layer by hand: relative Frobenius error of nf2.
  path = sorted(low["layers"])[0]  # output heads are not measured
  w = weights[path]
  qt = quant.quantize(w, "nf2", 64, False)
  err = quant.dequantize(qt, jnp.float32) - w
  want = float(jnp.linalg.norm(err) / jnp.linalg.norm(w))
  np.testing.assert_allclose(
    low["layers"][path]["relative_error"], want, rtol=1e-5
  )
