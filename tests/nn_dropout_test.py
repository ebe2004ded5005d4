"""Hash-mask dropout: rate, scaling, keys, independence."""

import jax
import jax.numpy as jnp
import numpy as np

from qlora_jax import nn as qnn
from qlora_jax.nn import hash_dropout


def test_rate_scale_and_determinism():
  x = jnp.ones((512, 512))
  key = jax.random.key(0)
  y = np.asarray(qnn.dropout(x, 0.1, key))
  kept = y != 0
  n = kept.size
  # Binomial(n, 0.9): 5 standard deviations.
  assert abs(kept.mean() - 0.9) < 5 * np.sqrt(0.09 / n)
  np.testing.assert_allclose(y[kept], 1 / 0.9, rtol=1e-6)
  np.testing.assert_array_equal(y, qnn.dropout(x, 0.1, key))
  other = np.asarray(qnn.dropout(x, 0.1, jax.random.key(1))) != 0
  # Two keys: masks agree where independent masks would, 0.82 of the time.
  agree = (kept == other).mean()
  assert abs(agree - 0.82) < 5 * np.sqrt(0.82 * 0.18 / n)


def test_masks_have_no_visible_structure():
  bits = np.asarray(hash_dropout.random_bits(jax.random.key(3), (1 << 16,)))
  ones = np.unpackbits(bits.view(np.uint8)).mean()
  assert abs(ones - 0.5) < 5 * np.sqrt(0.25 / (32 << 16))
  # Neighbouring elements are uncorrelated: P(both kept) = 0.5 * 0.5.
  keep = bits >= np.uint32(1 << 31)
  both = (keep[1:] & keep[:-1]).mean()
  assert abs(both - 0.25) < 5 * np.sqrt(0.25 * 0.75 / keep.size)


def test_module_follows_flax_dropout_interface():
  layer = qnn.Dropout(0.5)
  x = jnp.ones((8, 8))
  np.testing.assert_array_equal(layer.apply({}, x, deterministic=True), x)
  y = layer.apply(
    {}, x, deterministic=False, rngs={"dropout": jax.random.key(0)}
  )
  assert 0 < float((y == 0).mean()) < 1
