"""Dense packing of k-bit codes into uint8, first code in the high bits.

Codes are packed as one big-endian bit stream: for 4 bits, two codes per byte
with the first in the high nibble (bitsandbytes' layout); for 3 bits, eight
codes in three bytes; for k bits in general, 8 / gcd(k, 8) codes in
k / gcd(k, 8) bytes.
"""

import math

import jax.numpy as jnp
import numpy as np


def group_shape(bits: int) -> tuple[int, int]:
  """(codes, bytes) of the smallest whole group of k-bit codes."""
  g = math.gcd(bits, 8)
  return 8 // g, bits // g


def padded_length(n: int, bits: int) -> int:
  """Number of codes after padding `n` codes to a whole packing group."""
  codes, _ = group_shape(bits)
  return -(-n // codes) * codes


def packed_nbytes(n: int, bits: int) -> int:
  """Bytes that `n` packed k-bit codes take."""
  codes, nbytes = group_shape(bits)
  return padded_length(n, bits) // codes * nbytes


def pack(codes: jnp.ndarray, bits: int, pad_code: int = 0) -> jnp.ndarray:
  """Packs a flat uint8 array of k-bit codes; pads with `pad_code`."""
  codes = codes.reshape(-1).astype(jnp.uint8)
  n = codes.shape[0]
  pad = padded_length(n, bits) - n
  if pad:
    codes = jnp.concatenate([codes, jnp.full((pad,), pad_code, jnp.uint8)])
  if bits == 8:
    return codes
  if 8 % bits == 0:
    per_byte = 8 // bits
    shifts = jnp.asarray(
      [8 - bits * (j + 1) for j in range(per_byte)], jnp.uint8
    )
    grouped = codes.reshape(-1, per_byte) << shifts
    out = grouped[:, 0]
    for j in range(1, per_byte):
      out = out | grouped[:, j]
    return out
  # General k: explode to bits (most significant first), regroup by bytes.
  n_codes, n_bytes = group_shape(bits)
  bit_weights = jnp.asarray(1 << np.arange(bits - 1, -1, -1), jnp.uint8)
  bit_stream = (codes.reshape(-1, n_codes, 1) // bit_weights) & 1
  byte_bits = bit_stream.reshape(-1, n_bytes, 8)
  byte_weights = jnp.asarray(1 << np.arange(7, -1, -1), jnp.uint8)
  return jnp.sum(byte_bits * byte_weights, axis=-1, dtype=jnp.uint8).reshape(
    -1
  )


def unpack(packed: jnp.ndarray, bits: int, n: int) -> jnp.ndarray:
  """Inverse of `pack`: the first `n` k-bit codes as uint8."""
  packed = packed.reshape(-1).astype(jnp.uint8)
  if bits == 8:
    return packed[:n]
  if 8 % bits == 0:
    per_byte = 8 // bits
    mask = jnp.uint8((1 << bits) - 1)
    parts = [
      (packed >> jnp.uint8(8 - bits * (j + 1))) & mask for j in range(per_byte)
    ]
    return jnp.stack(parts, axis=-1).reshape(-1)[:n]
  n_codes, n_bytes = group_shape(bits)
  byte_weights = jnp.asarray(1 << np.arange(7, -1, -1), jnp.uint8)
  bit_stream = (packed.reshape(-1, n_bytes, 1) // byte_weights) & 1
  code_bits = bit_stream.reshape(-1, n_codes, bits)
  bit_weights = jnp.asarray(1 << np.arange(bits - 1, -1, -1), jnp.uint8)
  codes = jnp.sum(code_bits * bit_weights, axis=-1, dtype=jnp.uint8)
  return codes.reshape(-1)[:n]
