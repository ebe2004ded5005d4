"""`x @ W.T` for a frozen base weight W [out, in], float or quantized.

For a quantized W the dequantization happens inside the jitted matmul, and
the backward pass is a custom VJP that forms the input gradient only, by
dequantizing again: no float copy of W is kept as a residual and no weight
gradient is ever formed.

When each row of W holds whole blocks and whole bytes (the usual case), the
matmul runs over chunks of rows in a loop, and W is dequantized one chunk at
a time into a buffer that the loop reuses: the dequantized weight never
exists whole, and XLA cannot hoist every layer's dequantization to the start
of the step. Codes that share a byte are dequantized as separate planes (for
4 bits: the high nibbles hold the even columns, the low nibbles the odd
ones), and the activations are split the same way, so the planes need no
interleaving.

`kernel` picks the implementation of a quantized matmul: "xla" (the above,
the reference), "pallas" (the fused 4-bit kernel of `pallas_matmul`, in
interpret mode on the CPU), "cpu" (the fused 4-bit C++ kernel of
`cpu_matmul`, for matmuls over at most `cpu_matmul.MAX_TOKENS` tokens that
are not differentiated, XLA for the rest) or "auto" (Pallas on a single GPU
or TPU, the C++ kernel on a single CPU device when it builds, for the
layouts they read; XLA otherwise).
"""

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from qlora_jax import quant
from qlora_jax.nn import cpu_matmul, pallas_matmul
from qlora_jax.quant.blockwise import select_values
from qlora_jax.quant.codebooks import get_data_type

# Elements of W dequantized per loop iteration (4 MiB of float32).
CHUNK_ELEMENTS = 1 << 20
KERNELS = ("auto", "xla", "pallas", "cpu")
# Matmuls over at most this many tokens, not differentiated (decoding),
# read the code table by selects.
SELECT_MAX_TOKENS = 16


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


def chunk_rows(qt: quant.QuantizedTensor) -> int | None:
  """Rows per chunk for the planar chunked matmul, or None if W's layout
  does not allow it (then W is dequantized whole)."""
  if qt.ndim != 2:
    return None
  out_f, in_f = qt.shape
  bits = get_data_type(qt.data_type).bits
  if 8 % bits or in_f % qt.block_size or qt.block_size % (8 // bits):
    return None
  return _rows_per_chunk(out_f, in_f)


def _rows_per_chunk(out_f: int, in_f: int) -> int:
  """The most rows of [out_f, in_f], dividing out_f, within CHUNK_ELEMENTS
  (at least one)."""
  rows = max(1, min(out_f, CHUNK_ELEMENTS // in_f))
  while out_f % rows:
    rows -= 1
  return rows


def _planes(
  codes,
  absmax,
  minimum,
  data_type: str,
  block_size: int,
  dtype,
  select: bool = False,
):
  """Dequantized planes of a chunk: codes [rows, in*bits/8], absmax (or an
  asymmetric type's scale) and minimum (or None) [rows, in/block] ->
  per_byte arrays [rows, in/per_byte]; plane p holds columns p, p +
  per_byte, ...

  `select` reads a table of up to 16 entries by a tree of selects rather
  than a gather (the same values): XLA:CPU vectorizes the selects, but
  fuses them into larger loops that keep more of a training step's
  buffers alive, so only matmuls over a few tokens that are not
  differentiated (decoding) use it.
  """
  dt = get_data_type(data_type)
  per_byte = 8 // dt.bits
  rows, nbytes = codes.shape
  table = jnp.asarray(dt.values)
  mask = jnp.uint8((1 << dt.bits) - 1)
  per_block = block_size // per_byte
  planes = []
  for p in range(per_byte):
    idx = (codes >> jnp.uint8(8 - dt.bits * (p + 1))) & mask
    if select and dt.bits <= 4:
      values = select_values(dt.values, idx)
    else:
      values = table[idx.astype(jnp.int32)]
    values = values.reshape(rows, -1, per_block)
    values = values * absmax[:, :, None]
    if minimum is not None:
      values = values + minimum.astype(jnp.float32)[:, :, None]
    planes.append(values.reshape(rows, nbytes))
  return [w.astype(dtype) for w in planes]


def _chunked_layout(qt: quant.QuantizedTensor, rows: int):
  out_f, _ = qt.shape
  n = out_f // rows
  codes = qt.codes.reshape(n, rows, -1)
  absmax = quant.block_absmax(qt).reshape(n, rows, -1)
  minimum = None if qt.minimum is None else qt.minimum.reshape(n, rows, -1)
  return codes, absmax, minimum


def _split_columns(x: jnp.ndarray, per_byte: int) -> list[jnp.ndarray]:
  return [x[..., p::per_byte] for p in range(per_byte)]


def _chunked_forward(
  x, qt: quant.QuantizedTensor, dtype, rows: int, select: bool
):
  per_byte = 8 // get_data_type(qt.data_type).bits
  layout = _chunked_layout(qt, rows)
  xs = _split_columns(x, per_byte)

  def one(args):
    planes = _planes(*args, qt.data_type, qt.block_size, dtype, select)
    return sum(_dot_last(xp, w, 1) for xp, w in zip(xs, planes, strict=True))

  if layout[0].shape[0] == 1:  # one chunk: no loop (faster to compile)
    return one(jax.tree.map(lambda a: a[0], layout))
  ys = jax.lax.map(one, layout)  # [chunks, ..., rows]
  ys = jnp.moveaxis(ys, 0, -2)  # [..., chunks, rows]
  return ys.reshape(*x.shape[:-1], qt.shape[0])


def _chunked_input_grad(g, qt: quant.QuantizedTensor, dtype, rows: int):
  per_byte = 8 // get_data_type(qt.data_type).bits
  codes, absmax, minimum = _chunked_layout(qt, rows)
  n = codes.shape[0]
  gs = jnp.moveaxis(g.reshape(*g.shape[:-1], n, rows), -2, 0)
  in_f = qt.shape[1]
  init = [
    jnp.zeros((*g.shape[:-1], in_f // per_byte), dtype) for _ in range(per_byte)
  ]

  def body(acc, args):
    c, a, m, gc = args
    planes = _planes(c, a, m, qt.data_type, qt.block_size, dtype)
    return [
      d + _dot_last(gc, w, 0) for d, w in zip(acc, planes, strict=True)
    ], None

  xs = (codes, absmax, minimum, gs)
  if n == 1:  # one chunk: no loop (faster to compile)
    parts, _ = body(init, jax.tree.map(lambda a: a[0], xs))
  else:
    parts, _ = jax.lax.scan(body, init, xs)
  return jnp.stack(parts, axis=-1).reshape(*g.shape[:-1], in_f)


def _after(x: jnp.ndarray, qt: quant.QuantizedTensor):
  """(x, qt), with qt's codes made to depend on x (values unchanged).

  A weight's dequantization depends on the weights alone, so XLA is free
  to schedule it anywhere: its CPU scheduler starts every layer's at the
  top of a step, and a decoding loop hoists them all out of the loop, so
  that the whole model lives in float (an optimization barrier stops the
  hoisting but not the early start: the CPU pipeline drops barriers
  before it schedules). Adding to the codes a zero that XLA cannot fold,
  computed from one element of x (its sign bit shifted out: exact whatever
  x holds), makes W dequantized when it is used, one layer at a time.
  """
  first = jax.lax.slice(x, (0,) * x.ndim, (1,) * x.ndim).reshape(())
  bits = jax.lax.bitcast_convert_type(first.astype(jnp.float32), jnp.uint32)
  zero = ((bits >> jnp.uint32(31)) >> jnp.uint32(1)).astype(qt.codes.dtype)
  return x, dataclasses.replace(qt, codes=qt.codes + zero)


def resolve_kernel(kernel: str, qt: quant.QuantizedTensor) -> str:
  """ "xla", "pallas" or "cpu" for a requested `kernel` and the weight's
  layout.

  Raises:
    ValueError: an unknown kernel, or "pallas" / "cpu" for a layout the
      kernel cannot read (say, 3-bit codes), or "cpu" where the C++ kernel
      does not build; "auto" falls back to XLA for those.
  """
  if kernel not in KERNELS:
    raise ValueError(f"matmul kernel {kernel!r}: expected one of {KERNELS}")
  if kernel == "xla":
    return "xla"
  if kernel == "cpu":
    reason = cpu_matmul.unsupported_reason(qt) or cpu_matmul.unavailable()
    if reason is not None:
      raise ValueError(
        f"matmul kernel 'cpu' cannot run for this weight: {reason} (use "
        "'auto' to fall back to XLA)"
      )
    return "cpu"
  reason = pallas_matmul.unsupported_reason(qt)
  if kernel == "pallas":
    if reason is not None:
      raise ValueError(
        f"matmul kernel 'pallas' cannot read this weight: {reason} (use "
        "'auto' to fall back to XLA for such weights)"
      )
    return "pallas"
  # One device: the kernels are not partitioned over a mesh (no shard_map).
  if pallas_matmul.lowering_target() is not None:  # lowering for a device
    return "pallas" if reason is None else "xla"
  if jax.device_count() != 1:
    return "xla"
  backend = jax.default_backend()
  if backend in ("gpu", "tpu"):
    return "pallas" if reason is None else "xla"
  if backend == "cpu" and cpu_matmul.unsupported_reason(qt) is None:
    return "cpu" if cpu_matmul.unavailable() is None else "xla"
  return "xla"


def _forward(x, qt: quant.QuantizedTensor, dtype, kernel: str, select: bool):
  if kernel == "pallas":
    return pallas_matmul.matmul(x, qt, dtype)
  x, qt = _after(x, qt)
  rows = chunk_rows(qt)
  if rows is None:
    return _dot_last(x, quant.dequantize(qt, dtype), 1)
  return _chunked_forward(x, qt, dtype, rows, select)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def quantized_matmul(
  x: jnp.ndarray, qt: quant.QuantizedTensor, dtype, kernel: str = "xla"
):
  """x [..., in] @ dequantize(qt).T -> [..., out]; x is already in `dtype`;
  `kernel` is "xla", "pallas" or "cpu" (see `resolve_kernel`).

  Not differentiated (inference) over few tokens: the "cpu" kernel runs
  (at most cpu_matmul.MAX_TOKENS tokens), and on the XLA path the code
  table is read by selects (at most SELECT_MAX_TOKENS; see `_planes`)."""
  tokens = math.prod(x.shape[:-1])
  if kernel == "cpu" and tokens <= cpu_matmul.MAX_TOKENS:
    return cpu_matmul.matmul(x, qt, dtype)
  # Beyond that, and in training (_fwd, _bwd), "cpu" is the XLA path.
  return _forward(x, qt, dtype, kernel, tokens <= SELECT_MAX_TOKENS)


def _fwd(x, qt, dtype, kernel):
  return _forward(x, qt, dtype, kernel, False), qt


def _bwd(dtype, kernel, qt, g):
  g = g.astype(dtype)
  rows = chunk_rows(qt)
  if kernel == "pallas":
    dx = pallas_matmul.input_grad(g, qt, dtype)
  elif rows is None:
    g, qt = _after(g, qt)
    dx = _dot_last(g, quant.dequantize(qt, dtype), 0)
  else:
    g, qt = _after(g, qt)
    dx = _chunked_input_grad(g, qt, dtype, rows)
  return dx, _zero_cotangent(qt)


quantized_matmul.defvjp(_fwd, _bwd)


def float_chunk_rows(w: jnp.ndarray) -> int | None:
  """Rows per chunk for `upcast_matmul` of W, None if W is not 2-D."""
  if w.ndim != 2:
    return None
  return _rows_per_chunk(*w.shape)


def _as_bits(w: jnp.ndarray) -> jnp.ndarray:
  """A 16-bit float W as its uint16 bit patterns (exact, no copy)."""
  return jax.lax.bitcast_convert_type(w, jnp.uint16)


def _upcast(bits: jnp.ndarray, like, dtype) -> jnp.ndarray:
  """A chunk of `_as_bits` patterns as the float dtype `like`, in `dtype`.

  XLA:CPU computes bfloat16 slicing in float32: a bfloat16 W sliced inside
  a loop is converted whole to float32 before the loop. Slicing the bit
  patterns (integers) instead keeps the conversion inside the loop, one
  chunk at a time."""
  return jax.lax.bitcast_convert_type(bits, like).astype(dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def upcast_matmul(x: jnp.ndarray, w: jnp.ndarray, dtype, rows: int):
  """x [..., in] @ W.T for a float W [out, in] stored in a 16-bit float
  dtype narrower than the compute `dtype` (a bfloat16 base, float32
  matmuls): W is upcast `rows` rows at a time inside a loop, forward and
  backward, so that no full-size copy of W in `dtype` exists. Each output
  element is the same dot over the whole input axis as the unchunked
  matmul's. The gradient of W, when W is differentiated, is the usual one,
  cast to W's dtype."""
  out_f = w.shape[0]
  chunks = _as_bits(w).reshape(out_f // rows, rows, w.shape[1])
  ys = jax.lax.map(
    lambda c: _dot_last(x, _upcast(c, w.dtype, dtype), 1), chunks
  )
  ys = jnp.moveaxis(ys, 0, -2)  # [..., chunks, rows]
  return ys.reshape(*x.shape[:-1], out_f)


def _upcast_fwd(x, w, dtype, rows):
  return upcast_matmul(x, w, dtype, rows), (x, w)


def _upcast_bwd(dtype, rows, res, g):
  x, w = res
  g = g.astype(dtype)
  n = w.shape[0] // rows
  chunks = _as_bits(w).reshape(n, rows, w.shape[1])
  gs = jnp.moveaxis(g.reshape(*g.shape[:-1], n, rows), -2, 0)

  def body(acc, args):
    c, gc = args
    return acc + _dot_last(gc, _upcast(c, w.dtype, dtype), 0), None

  init = jnp.zeros((*g.shape[:-1], w.shape[1]), dtype)
  dx, _ = jax.lax.scan(body, init, (chunks, gs))
  lead = tuple(range(g.ndim - 1))
  dw = jax.lax.dot_general(g, x.astype(dtype), ((lead, lead), ((), ())))
  return dx.astype(x.dtype), dw.astype(w.dtype)


upcast_matmul.defvjp(_upcast_fwd, _upcast_bwd)


def frozen_matmul(
  x: jnp.ndarray, weight, dtype, kernel: str = "auto"
) -> jnp.ndarray:
  """x [..., in] @ W.T for W [out, in]: a QuantizedTensor or a float array;
  `kernel` ("auto", "xla", "pallas", "cpu") applies to a QuantizedTensor.
  A float W narrower than `dtype` is upcast in chunks (`upcast_matmul`)."""
  if isinstance(weight, quant.QuantizedTensor):
    kernel = resolve_kernel(kernel, weight)
    return quantized_matmul(x.astype(dtype), weight, jnp.dtype(dtype), kernel)
  dtype = jnp.dtype(dtype)
  if jnp.dtype(weight.dtype).itemsize == 2 and dtype.itemsize == 4:
    rows = float_chunk_rows(weight)
    if rows is not None:
      return upcast_matmul(x.astype(dtype), weight, dtype, rows)
  return _dot_last(x.astype(dtype), weight.astype(dtype), 1)


def dequantized(weight, dtype=jnp.float32) -> jnp.ndarray:
  """The float value of a base weight (dequantized if needed)."""
  if isinstance(weight, quant.QuantizedTensor):
    return quant.dequantize(weight, dtype)
  return weight.astype(dtype)
