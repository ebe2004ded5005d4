"""Adapter initialisations against their definitions."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qlora_jax import nn as qnn
from qlora_jax import quant

OUT, IN = 96, 128


def _w(seed=0):
  # A weight with a decaying spectrum, like pretrained ones.
  k1, k2 = jax.random.split(jax.random.key(seed))
  u = jax.random.normal(k1, (OUT, 32))
  v = jax.random.normal(k2, (32, IN))
  return (u * (0.8 ** jnp.arange(32))) @ v / 8 + 0.01 * jax.random.normal(
    k2, (OUT, IN)
  )


NF4 = quant.QuantSpec("nf4", 64, True)


def test_kaiming_uniform_bounds_and_zero_b():
  spec = qnn.LoraSpec(rank=16, alpha=32)
  out = qnn.init_adapter(jax.random.key(1), _w(), spec, None)
  a, b = out["lora_a"], out["lora_b"]
  assert a.shape == (IN, 16) and b.shape == (16, OUT)
  np.testing.assert_array_equal(b, 0.0)
  bound = 1 / np.sqrt(IN)  # kaiming_uniform(a=sqrt(5)) on [r, in]
  assert float(jnp.abs(a).max()) <= bound
  # Uniform on [-bound, bound]: std = bound / sqrt(3), 2048 draws -> ~3%.
  assert abs(float(a.std()) / (bound / np.sqrt(3)) - 1) < 0.06


def test_gaussian_std_is_one_over_r():
  spec = qnn.LoraSpec(rank=8, init="gaussian")
  a = qnn.init_adapter(jax.random.key(2), _w(), spec, None)["lora_a"]
  assert abs(float(a.std()) * 8 - 1) < 0.06  # 1024 draws


def test_pissa_reproduces_the_weight_without_quantization():
  w = _w()
  spec = qnn.LoraSpec(rank=8, alpha=16, init="pissa")
  out = qnn.init_adapter(jax.random.key(0), w, spec, None)
  rebuilt = out["weight"] + spec.scale * (out["lora_a"] @ out["lora_b"]).T
  np.testing.assert_allclose(rebuilt, w, atol=1e-5)
  # The adapter holds the top-r singular directions of W: the residual's
  # largest singular value is W's (r+1)-th.
  s_w = jnp.linalg.svd(w, compute_uv=False)
  s_res = jnp.linalg.svd(out["weight"], compute_uv=False)
  np.testing.assert_allclose(s_res[0], s_w[8], rtol=1e-4)


def test_pissa_quantizes_the_residual():
  w = _w()
  spec = qnn.LoraSpec(rank=8, alpha=16, init="pissa")
  out = qnn.init_adapter(jax.random.key(0), w, spec, NF4)
  resid = w - spec.scale * (out["lora_a"] @ out["lora_b"]).T
  want = quant.quantize(resid, "nf4", 64, True)
  np.testing.assert_array_equal(out["weight"].codes, want.codes)


def _loftq_error(w, iters):
  spec = qnn.LoraSpec(rank=8, alpha=16, init="loftq", loftq_iters=iters)
  out = qnn.init_adapter(jax.random.key(0), w, spec, NF4)
  q = quant.dequantize(out["weight"], jnp.float32)
  return float(
    jnp.linalg.norm(w - (q + spec.scale * (out["lora_a"] @ out["lora_b"]).T))
  )


def test_loftq_cancels_quantization_error():
  w = _w()
  plain = float(
    jnp.linalg.norm(
      w - quant.dequantize(quant.quantize(w, "nf4", 64, True), jnp.float32)
    )
  )
  one, five = _loftq_error(w, 1), _loftq_error(w, 5)
  assert one < plain
  assert five <= one * (1 + 1e-6)


def test_loftq_needs_a_quantized_base_and_rank_is_checked():
  with pytest.raises(ValueError, match="loftq.*quantized"):
    qnn.init_adapter(jax.random.key(0), _w(), qnn.LoraSpec(init="loftq"), None)
  with pytest.raises(ValueError, match="rank 200 of up exceeds"):
    qnn.init_adapter(
      jax.random.key(0), _w(), qnn.LoraSpec(rank=200), None, name="up"
    )


@pytest.mark.parametrize(
  "kwargs,field,match",
  [
    (dict(init="svd"), "init", "unknown lora init 'svd'"),
    (dict(rank=0), "rank", "must be >= 1, got 0"),
    (dict(rank=4.0), "rank", "expected a whole number, got 4.0"),
    (dict(dropout=1.5), "dropout", r"in \[0, 1\), got 1.5"),
    (dict(loftq_iters=0), "loftq_iters", ">= 1, got 0"),
    (dict(qa=True, dora=True), "qa", "no dora"),
  ],
)
def test_bad_specs_raise_naming_the_field(kwargs, field, match):
  with pytest.raises(quant.SpecError, match=f"^{field}: .*{match}") as e:
    qnn.LoraSpec(**kwargs)
  assert e.value.field == field


def test_bf16_base_is_quantized_from_bf16():
  w = _w()
  out = qnn.init_adapter(jax.random.key(0), w, None, NF4, jnp.bfloat16)
  assert out["weight"].dtype == "bfloat16"
  want = quant.quantize(w.astype(jnp.bfloat16), "nf4", 64, True)
  np.testing.assert_array_equal(out["weight"].codes, want.codes)
