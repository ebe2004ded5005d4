"""k-bit blockwise quantization (NF-k, Int-k, FP4, FP8), as bitsandbytes,
and GGML's Q8_0 (the decoding head).

Pure jax.numpy functions; imports no other package of qlora_jax and no
Flax.
"""

from qlora_jax.quant.codebooks import SUPPORTED_BITS, DataType, get_data_type
from qlora_jax.quant.q8_0 import Q8_0Tensor, dequantize_q8_0, quantize_q8_0
from qlora_jax.quant.tensor import (
  MemoryReport,
  NonFiniteError,
  QuantizedTensor,
  QuantSpec,
  SpecError,
  block_absmax,
  dequantize,
  expected_bits_per_param,
  memory_report,
  quantize,
)

__all__ = [
  "SUPPORTED_BITS",
  "DataType",
  "MemoryReport",
  "NonFiniteError",
  "QuantSpec",
  "Q8_0Tensor",
  "QuantizedTensor",
  "SpecError",
  "block_absmax",
  "dequantize",
  "dequantize_q8_0",
  "expected_bits_per_param",
  "get_data_type",
  "memory_report",
  "quantize",
  "quantize_q8_0",
]
