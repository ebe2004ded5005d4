"""Shared by the interop tests: random adapters and a relative error."""

import jax.numpy as jnp
import numpy as np

from qlora_jax import nn as qnn

IDS = np.array([[1, 17, 4, 42, 8, 2, 33, 9], [1, 5, 6, 7, 80, 12, 3, 4]])


def rel_error(ours, ref) -> float:
  """Max-norm error relative to the reference's largest entry."""
  return float(np.abs(np.asarray(ours) - ref).max() / np.abs(ref).max())


def randomize(lm, seed: int = 0):
  """Every trainable leaf random (B = 0 would hide layout errors); NumPy's
  generator, which compiles nothing."""
  flat = qnn.flatten(lm.variables)
  rng = np.random.default_rng(seed)
  for path in sorted(p for p in flat if p[0] == qnn.PARAMS):
    x = rng.standard_normal(flat[path].shape).astype(np.float32)
    x = 0.5 + abs(x) if path[-1] == "lora_magnitude" else 0.1 * x
    flat[path] = jnp.asarray(x)
  lm.variables = qnn.unflatten(flat)
  return lm
