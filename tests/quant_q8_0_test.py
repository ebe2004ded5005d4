"""GGML's Q8_0 (`quant.quantize_q8_0`) against a hand computation and
against gguf-py's quantizer (llama.cpp's own Python package), byte for
byte; dequantization d * q is exact in float32."""

import gguf
import jax.numpy as jnp
import numpy as np
import pytest

from qlora_jax import quant


def test_a_block_by_hand():
  # max |x| = 127: d = 1 exactly, so q = x rounded, halves away from zero
  # (C's roundf; round-half-even would give 2, -2, 0, 126).
  x = np.zeros(64, np.float32)
  x[:6] = [127.0, 2.5, -2.5, 0.5, 126.5, -0.49]
  x[32:] = 0.0  # a block of zeros: d = 0, codes 0
  q = quant.quantize_q8_0(jnp.asarray(x))
  np.testing.assert_array_equal(np.asarray(q.scales), np.float16([1.0, 0.0]))
  np.testing.assert_array_equal(
    np.asarray(q.codes)[:6], np.int8([127, 3, -3, 1, 127, 0])
  )
  assert not np.asarray(q.codes)[6:].any()
  # max |x| = 2: d = float16(2 / 127); q = roundf(x * (1 / d32)).
  y = np.linspace(-2, 1, 32, dtype=np.float32)
  d32 = np.float32(2) / np.float32(127)
  want = np.trunc(y * (np.float32(1) / d32) + np.sign(y) * np.float32(0.5))
  got = quant.quantize_q8_0(jnp.asarray(y))
  assert np.asarray(got.scales)[0] == np.float16(d32)
  np.testing.assert_array_equal(np.asarray(got.codes), want.astype(np.int8))


def test_equals_gguf_py_byte_for_byte():
  # Rows of 7 blocks with outliers, ties and zeros: gguf.quants' Q8_0 bytes
  # (float16 d then 32 int8 per block) are ours.
  rng = np.random.default_rng(0)
  w = rng.standard_normal((11, 224)).astype(np.float32)
  w[0, :32] = 0.0
  w[1, 5] = 40.0
  w[2, :32] = np.arange(32) - 15.5  # many exact halves after scaling
  raw = gguf.quants.quantize(w, gguf.GGMLQuantizationType.Q8_0)
  blocks = raw.reshape(11, 7, 34)
  want_d = blocks[..., :2].copy().view(np.float16)[..., 0]
  want_q = blocks[..., 2:].copy().view(np.int8).reshape(11, 224)
  q = quant.quantize_q8_0(jnp.asarray(w))
  np.testing.assert_array_equal(np.asarray(q.scales), want_d)
  np.testing.assert_array_equal(np.asarray(q.codes), want_q)


def test_dequantize_is_d_times_q_and_requantizing_is_the_identity():
  rng = np.random.default_rng(1)
  w = rng.standard_normal((5, 96)).astype(np.float32) * 3
  q = quant.quantize_q8_0(jnp.asarray(w))
  d = np.asarray(q.scales, np.float64)
  codes = np.asarray(q.codes, np.float64)
  want = (codes.reshape(5, 3, 32) * d[..., None]).reshape(5, 96)
  back = np.asarray(quant.dequantize_q8_0(q))
  np.testing.assert_array_equal(back.astype(np.float64), want)  # exact
  # Within half a step of the input, plus the float16 rounding of the step
  # (codes are rounded with the float32 d32 = d (1 +- 2^-11), |q| <= 127):
  # |d q - w| <= d32 (0.5 + 127 * 2^-11).
  d32 = np.repeat(d, 32, axis=1) * (1 + 2.0**-11)
  assert (np.abs(back - w) <= d32 * (0.5 + 127 * 2.0**-11)).all()
  again = quant.quantize_q8_0(jnp.asarray(back))  # d * q is a fixed point
  np.testing.assert_array_equal(np.asarray(again.codes), np.asarray(q.codes))
  np.testing.assert_array_equal(np.asarray(again.scales), np.asarray(q.scales))


def test_rows_of_partial_blocks_are_refused():
  with pytest.raises(ValueError, match="whole blocks of 32"):
    quant.quantize_q8_0(jnp.zeros((3, 48)))
