"""`x @ W.T` for a frozen base weight W [out, in], float or quantized.

For a quantized W the dequantization happens inside the jitted matmul, and
the backward pass is a custom VJP that forms the input gradient only, by
dequantizing again: no float copy of W is kept as a residual and no weight
gradient is ever formed.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from qlora_jax import quant


def _dot_last(x: jnp.ndarray, w: jnp.ndarray, w_axis: int) -> jnp.ndarray:
  """Contracts x's last axis with w's axis `w_axis`."""
  dims = (((x.ndim - 1,), (w_axis,)), ((), ()))
  return jax.lax.dot_general(x, w, dims)


def _zero_cotangent(qt: quant.QuantizedTensor) -> quant.QuantizedTensor:
  def zero(a):
    if jnp.issubdtype(a.dtype, jnp.floating):
      return jnp.zeros_like(a)
    return np.zeros(a.shape, jax.dtypes.float0)

  return jax.tree.map(zero, qt)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def quantized_matmul(x: jnp.ndarray, qt: quant.QuantizedTensor, dtype):
  """x [..., in] @ dequantize(qt).T -> [..., out]; x is already in `dtype`."""
  return _dot_last(x, quant.dequantize(qt, dtype), 1)


def _fwd(x, qt, dtype):
  return quantized_matmul(x, qt, dtype), qt


def _bwd(dtype, qt, g):
  dx = _dot_last(g.astype(dtype), quant.dequantize(qt, dtype), 0)
  return dx, _zero_cotangent(qt)


quantized_matmul.defvjp(_fwd, _bwd)


def frozen_matmul(x: jnp.ndarray, weight, dtype) -> jnp.ndarray:
  """x [..., in] @ W.T for W [out, in]: a QuantizedTensor or a float array."""
  if isinstance(weight, quant.QuantizedTensor):
    return quantized_matmul(x.astype(dtype), weight, jnp.dtype(dtype))
  return _dot_last(x.astype(dtype), weight.astype(dtype), 1)


def dequantized(weight, dtype=jnp.float32) -> jnp.ndarray:
  """The float value of a base weight (dequantized if needed)."""
  if isinstance(weight, quant.QuantizedTensor):
    return quant.dequantize(weight, dtype)
  return weight.astype(dtype)
