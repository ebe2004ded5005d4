"""GGML's Q4_1 blocks to and from int4_asym QuantizedTensors (blocks of 32).

A Q4_1 block of 32 values holds float16 d, float16 m, then 16 bytes of
codes, element j in the low nibble of byte j and element j + 16 in its
high nibble. Codes and scales carry over as they are: `gguf_reader` loads
a Q4_1 base without requantization, `interop.gguf_export` writes a QA-LoRA
merge exactly.
"""

import jax.numpy as jnp
import numpy as np

from qlora_jax import quant
from qlora_jax.models.safetensors_reader import CheckpointError

# GGML's Q4_1 is our int4_asym in blocks of 32 (float16 d and m).
Q4_1_SPEC = quant.QuantSpec("int4_asym", 32, False)


def q4_1_to_quantized(raw: np.ndarray, shape, what: str):
  """Q4_1 blocks (bytes [rows, bytes per row]) as an int4_asym
  QuantizedTensor of `shape`; a non-finite d or m raises CheckpointError
  naming `what` and the block."""
  blocks = raw.reshape(-1, 20)
  d = blocks[:, 0:2].copy().view(np.float16).reshape(-1)
  m = blocks[:, 2:4].copy().view(np.float16).reshape(-1)
  for name, part in (("scale d", d), ("minimum m", m)):
    if not np.isfinite(part).all():
      block = int(np.argmin(np.isfinite(part)))
      raise CheckpointError(f"{what} has a non-finite {name} in block {block}")
  qs = blocks[:, 4:]
  q = np.concatenate([qs & 0xF, qs >> 4], axis=1).reshape(-1)
  codes = (q[0::2] << 4) | q[1::2]  # ours: first code in the high nibble
  return quant.QuantizedTensor(
    jnp.asarray(codes),
    jnp.asarray(d),
    None,
    None,
    shape=tuple(shape),
    data_type=Q4_1_SPEC.data_type,
    block_size=Q4_1_SPEC.block_size,
    dtype="float32",
    minimum=jnp.asarray(m),
  )


def quantized_to_q4_1(qt) -> np.ndarray:
  """An int4_asym QuantizedTensor in blocks of 32 (one matrix) as GGML Q4_1
  bytes [rows, bytes per row]; a float32 minimum (an exact QA-LoRA merge)
  is rounded to float16, the format's type."""
  if qt.spec != Q4_1_SPEC or qt.ndim != 2 or qt.shape[1] % 32:
    raise ValueError(f"{qt.spec} of shape {qt.shape} is not Q4_1's layout")
  codes = np.asarray(qt.codes)
  q = np.empty(codes.size * 2, np.uint8)
  q[0::2], q[1::2] = codes >> 4, codes & 0xF
  q = q[: qt.size].reshape(-1, 32)
  qs = q[:, :16] | (q[:, 16:] << 4)
  d = np.asarray(qt.absmax).astype(np.float16).view(np.uint8).reshape(-1, 2)
  m = np.asarray(qt.minimum).astype(np.float16).view(np.uint8).reshape(-1, 2)
  return np.concatenate([d, m, qs], axis=1).reshape(qt.shape[0], -1)
