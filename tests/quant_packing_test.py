"""Dense k-bit packing: identity, sizes and the exact byte layout."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qlora_jax.quant import packing

BITS = (2, 3, 4, 5, 6, 8)
# One compile per call shape instead of one per operation.
_pack = jax.jit(packing.pack, static_argnums=(1, 2))
_unpack = jax.jit(packing.unpack, static_argnums=(1, 2))


def _pack_reference(codes: np.ndarray, bits: int, pad_code: int) -> bytes:
  """Independent packer: a big-endian bit string, cut into bytes."""
  codes = list(codes)
  per_group = {2: 4, 3: 8, 4: 2, 5: 8, 6: 4, 8: 1}[bits]
  codes += [pad_code] * (-len(codes) % per_group)
  stream = "".join(format(int(c), f"0{bits}b") for c in codes)
  return bytes(int(stream[i : i + 8], 2) for i in range(0, len(stream), 8))


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("n", [1, 7, 9, 1000])
def test_pack_unpack_identity_and_layout(bits, n):
  rng = np.random.default_rng(bits * 1000 + n)
  codes = rng.integers(0, 2**bits, n).astype(np.uint8)
  pad = 2**bits - 1
  packed = np.asarray(_pack(jnp.asarray(codes), bits, pad))
  assert packed.dtype == np.uint8
  assert packed.shape == (packing.packed_nbytes(n, bits),)
  assert packed.tobytes() == _pack_reference(codes, bits, pad)
  back = np.asarray(_unpack(jnp.asarray(packed), bits, n))
  assert back.dtype == np.uint8
  np.testing.assert_array_equal(back, codes)


def test_four_bits_first_code_in_high_nibble():
  packed = packing.pack(jnp.asarray([1, 2, 15, 0, 9], jnp.uint8), 4, 7)
  # bitsandbytes' layout; the odd count is padded with the pad code.
  assert np.asarray(packed).tolist() == [0x12, 0xF0, 0x97]


def test_three_bits_eight_codes_in_three_bytes():
  codes = jnp.asarray([1, 2, 3, 4, 5, 6, 7, 0], jnp.uint8)
  # 001 010 011 100 101 110 111 000 -> 00101001 11001011 10111000
  assert np.asarray(packing.pack(codes, 3)).tolist() == [0x29, 0xCB, 0xB8]


def test_six_bits_four_codes_in_three_bytes():
  codes = jnp.asarray([63, 0, 21, 42], jnp.uint8)
  # 111111 000000 010101 101010 -> 11111100 00000101 01101010
  assert np.asarray(packing.pack(codes, 6)).tolist() == [0xFC, 0x05, 0x6A]


@pytest.mark.parametrize(
  "bits,n,nbytes",
  [(2, 5, 2), (3, 1, 3), (3, 9, 6), (4, 3, 2), (5, 8, 5), (6, 5, 6), (8, 3, 3)],
)
def test_packed_sizes(bits, n, nbytes):
  assert packing.packed_nbytes(n, bits) == nbytes


def test_group_shapes():
  got = {b: packing.group_shape(b) for b in BITS}
  assert got == {
    2: (4, 1),
    3: (8, 3),
    4: (2, 1),
    5: (8, 5),
    6: (4, 3),
    8: (1, 1),
  }
