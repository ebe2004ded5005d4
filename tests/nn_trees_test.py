"""Trainable / frozen split and parameter accounting."""

import jax.numpy as jnp
import numpy as np
import pytest

from qlora_jax import nn as qnn
from qlora_jax import quant


def _variables():
  qt = quant.quantize(jnp.ones((64, 128)), "nf4", 64, True)
  return {
    "base": {
      "emb": {"embedding": jnp.ones((10, 4))},
      "up": {"weight": qt, "bias": jnp.zeros(64)},
      "head": {"weight": jnp.ones((3, 64))},
    },
    "params": {
      "up": {"lora_a": jnp.ones((128, 2)), "lora_b": jnp.zeros((2, 64))}
    },
  }


def test_split_then_merge_is_the_identity():
  v = _variables()
  trainable, frozen = qnn.split_trainable(v, train_patterns=["^head/"])
  assert set(qnn.flatten(trainable)) == {
    ("params", "up", "lora_a"),
    ("params", "up", "lora_b"),
    ("base", "head", "weight"),
  }
  merged = qnn.merge_trees(trainable, frozen)
  assert qnn.flatten(merged).keys() == qnn.flatten(v).keys()
  for k, leaf in qnn.flatten(v).items():
    assert qnn.flatten(merged)[k] is leaf


def test_split_errors():
  with pytest.raises(
    ValueError, match="cannot train up/weight: it is quantized"
  ):
    qnn.split_trainable(_variables(), train_patterns=["up/weight"])
  with pytest.raises(ValueError, match="match no frozen variable"):
    qnn.split_trainable(_variables(), train_patterns=["nothing"])
  with pytest.raises(ValueError, match="in two trees"):
    qnn.merge_trees(_variables(), _variables())


def test_counts():
  v = _variables()
  # 40 + 64*128 (quantized counts its elements) + 64 + 192 + 256 + 128.
  assert qnn.num_params(v) == 40 + 64 * 128 + 64 + 192 + 256 + 128
  qt = v["base"]["up"]["weight"]
  # 4096 code bytes + 128 uint8 absmax + 1 f32 absmax2 + f32 offset.
  assert qt.nbytes == 4096 + 128 + 4 + 4
  total = 160 + qt.nbytes + 256 + 768 + 1024 + 512
  assert qnn.num_bytes(v) == total
  np.testing.assert_equal(qnn.num_params({}), 0)
