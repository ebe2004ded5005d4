"""Dropout with masks from a counter-based hash, seeded by the dropout key.

Threefry, JAX's default PRNG, costs ~20 integer rounds per 32 random bits;
on a CPU the dropout masks of a fine-tuning step (every adapter input,
every hidden state) then take more time than the matmuls. Here one
threefry draw per call gives two 32-bit seeds, and each element's bits are
the murmur3 finalizer of (element index, seeds): a few vectorised integer
operations. Masks are a pure function of the key, as with nn.Dropout.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp


def _fmix32(h: jnp.ndarray) -> jnp.ndarray:
  """murmur3's 32-bit finalizer: a bijection that mixes every input bit."""
  h = h ^ (h >> 16)
  h = h * jnp.uint32(0x85EBCA6B)
  h = h ^ (h >> 13)
  h = h * jnp.uint32(0xC2B2AE35)
  return h ^ (h >> 16)


def random_bits(key: jax.Array, shape) -> jnp.ndarray:
  """uint32 bits of `shape`, a deterministic function of `key`."""
  seeds = jax.random.bits(key, (2,), jnp.uint32)
  size = 1
  for d in shape:
    size *= d
  index = jax.lax.iota(jnp.uint32, size).reshape(shape)
  h = _fmix32(index * jnp.uint32(0x9E3779B9) + seeds[0]) ^ seeds[1]
  return _fmix32(h)


def dropout(x: jnp.ndarray, rate: float, key: jax.Array) -> jnp.ndarray:
  """Zeroes each element with probability `rate`, scales the rest."""
  if rate == 0.0:
    return x
  threshold = jnp.uint32(min(int(round(rate * 2**32)), 2**32 - 1))
  keep = random_bits(key, x.shape) >= threshold
  return jnp.where(keep, x / jnp.asarray(1.0 - rate, x.dtype), 0).astype(
    x.dtype
  )


class Dropout(nn.Module):
  """flax.linen.Dropout's interface with hash masks ("dropout" RNG)."""

  rate: float
  deterministic: bool | None = None

  @nn.compact
  def __call__(
    self, x: jnp.ndarray, deterministic: bool | None = None
  ) -> jnp.ndarray:
    deterministic = nn.merge_param(
      "deterministic", self.deterministic, deterministic
    )
    if deterministic or self.rate == 0.0:
      return x
    return dropout(x, self.rate, self.make_rng("dropout"))
