"""The Pallas kernels behind `pallas_matmul`: one forward and one input
gradient per target (see that module's docstring for the design).

Shapes: x [m, k], g [m, n], codes [n, k/2] uint8, W [n, k]. In a tile of
codes [rows, bk/2] a block of `block_size` elements is `block_size / 2`
consecutive bytes of one row; a tile holds `scales_per_tile` blocks per row,
or one block spans `tiles_per_scale` tiles.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as plgpu

from qlora_jax.quant.blockwise import DQ_GROUP, select_values
from qlora_jax.quant.dynamic_map import DYNAMIC_MAP_SIGNED


@dataclasses.dataclass(frozen=True)
class Spec:
  """Static description of one call: true sizes, tiles, table, dtype."""

  m: int
  n: int
  k: int
  block_size: int
  block_m: int
  block_n: int
  block_k: int
  table: tuple[float, ...]  # the 16 code values
  dtype: str  # compute dtype of the dots' operands and of the result
  num_warps: int | None
  num_stages: int | None
  interpret: bool

  @property
  def scales_per_tile(self) -> int:
    return max(1, self.block_k // self.block_size)

  @property
  def tiles_per_scale(self) -> int:
    return max(1, self.block_size // self.block_k)


def _dot(a, b, b_contract: int):
  """a [p, q] . b, contracting a's axis 1 with b's axis `b_contract`, f32."""
  dims = (((1,), (b_contract,)), ((), ()))
  return lax.dot_general(a, b, dims, preferred_element_type=jnp.float32)


def _planes(codes, scales, spec: Spec, lookup, expand):
  """codes [rows, w] uint8 and scales [rows, spt] f32 -> (W_hi, W_lo), each
  [rows, w] in spec.dtype: table[code] * absmax rounded once, as XLA does."""
  c = codes.astype(jnp.int32)
  values = (lookup(c >> 4), lookup(c & 15))
  return tuple(expand(v, scales).astype(spec.dtype) for v in values)


def _expand_by_reshape(values, scales):
  """values [rows, w] times the scale of each element's block (Triton:
  splitting the minor axis in power-of-two parts keeps the layout)."""
  rows, width = values.shape
  spt = scales.shape[1]
  if spt == 1:
    return values * scales
  split = values.reshape(rows, spt, width // spt) * scales[:, :, None]
  return split.reshape(rows, width)


def _expand_by_select(values, scales):
  """As `_expand_by_reshape` with lane-wise selects (Mosaic keeps the minor
  axis whole)."""
  rows, width = values.shape
  spt = scales.shape[1]
  if spt == 1:
    return values * scales
  # lax.div, not //: floor division lowers through `sign`, whose Mosaic rule
  # asks the device for its TPU generation (none when lowering elsewhere).
  iota = lax.broadcasted_iota(jnp.int32, values.shape, 1)
  block = lax.div(iota, jnp.int32(width // spt))
  expanded = scales[:, 0:1]
  for j in range(1, spt):
    expanded = jnp.where(block == j, scales[:, j : j + 1], expanded)
  return values * expanded


# GPU (Triton): whole arrays as refs, tiles addressed by program ids; loads
# and stores are masked on the dimensions that are not whole tiles.


def _mask(r0, nr: int, rows: int, c0, nc: int, cols: int):
  mask = None
  if rows % nr:
    mask = r0 + lax.broadcasted_iota(jnp.int32, (nr, 1), 0) < rows
  if cols % nc:
    col_mask = c0 + lax.broadcasted_iota(jnp.int32, (1, nc), 1) < cols
    mask = col_mask if mask is None else mask & col_mask
  return None if mask is None else jnp.broadcast_to(mask, (nr, nc))


def _load(ref, r0, nr: int, c0, nc: int):
  view = ref.at[pl.ds(r0, nr), pl.ds(c0, nc)]
  mask = _mask(r0, nr, ref.shape[0], c0, nc, ref.shape[1])
  if mask is None:
    return view[...]
  return plgpu.load(view, mask=mask, other=0)


def _store(ref, value, r0, c0):
  nr, nc = value.shape
  view = ref.at[pl.ds(r0, nr), pl.ds(c0, nc)]
  mask = _mask(r0, nr, ref.shape[0], c0, nc, ref.shape[1])
  if mask is None:
    view[...] = value
  else:
    plgpu.store(view, value, mask=mask)


def _gpu_weight_tile(refs, spec: Spec, n0, rows: int, k_step):
  """(W_hi, W_lo) [rows, bk/2] of rows n0.. and the k_step-th K tile."""
  codes_ref, absmax_ref, table_ref, *dq = refs
  half = spec.block_k // 2
  codes = _load(codes_ref, n0, rows, pl.multiple_of(k_step * half, half), half)
  spt = spec.scales_per_tile
  if spec.block_size <= spec.block_k:
    col0 = k_step * spt
  else:
    col0 = k_step // spec.tiles_per_scale
  scales = _load(absmax_ref, n0, rows, col0, spt)
  if dq:
    map_ref, absmax2_ref, offset_ref = dq
    row = n0 + lax.broadcasted_iota(jnp.int32, (rows, 1), 0)
    col = col0 + lax.broadcasted_iota(jnp.int32, (1, spt), 1)
    block = row * absmax_ref.shape[1] + col
    group = jnp.minimum(block // DQ_GROUP, absmax2_ref.shape[0] - 1)
    code2 = map_ref[scales.astype(jnp.int32)]
    scales = code2 * absmax2_ref[group] + offset_ref[0]
  lookup = lambda idx: table_ref[idx]
  return _planes(codes, scales, spec, lookup, _expand_by_reshape)


def _gpu_forward_kernel(x_ref, *refs, spec: Spec):
  *weight_refs, o_ref = refs
  bm, bn, bk = spec.block_m, spec.block_n, spec.block_k
  r0, n0 = pl.program_id(0) * bm, pl.program_id(1) * bn

  def body(k_step, acc):
    x = _load(x_ref, r0, bm, pl.multiple_of(k_step * bk, bk), bk)
    x_even, x_odd = lax.unstack(x.reshape(bm, bk // 2, 2), axis=2)
    w_hi, w_lo = _gpu_weight_tile(weight_refs, spec, n0, bn, k_step)
    return acc + _dot(x_even, w_hi, 1) + _dot(x_odd, w_lo, 1)

  acc = jnp.zeros((bm, bn), jnp.float32)
  acc = lax.fori_loop(0, pl.cdiv(spec.k, bk), body, acc)
  _store(o_ref, acc.astype(o_ref.dtype), r0, n0)


def _gpu_input_grad_kernel(g_ref, *refs, spec: Spec):
  *weight_refs, o_ref = refs
  bm, bn, bk = spec.block_m, spec.block_n, spec.block_k
  r0, k_step = pl.program_id(0) * bm, pl.program_id(1)

  def body(n_step, acc):
    n0 = pl.multiple_of(n_step * bn, bn)
    g = _load(g_ref, r0, bm, n0, bn)
    w_hi, w_lo = _gpu_weight_tile(weight_refs, spec, n0, bn, k_step)
    return acc[0] + _dot(g, w_hi, 0), acc[1] + _dot(g, w_lo, 0)

  zeros = jnp.zeros((bm, bk // 2), jnp.float32)
  hi, lo = lax.fori_loop(0, pl.cdiv(spec.n, bn), body, (zeros, zeros))
  dx = jnp.stack([hi, lo], axis=-1).reshape(bm, bk)
  _store(o_ref, dx.astype(o_ref.dtype), r0, k_step * bk)


def _whole(a) -> pl.BlockSpec:
  return pl.BlockSpec(a.shape, lambda *_: (0,) * a.ndim)


def _gpu_call(kernel, spec: Spec, grid, lead, codes, absmax, dq, out_shape):
  weights = [codes, absmax, jnp.asarray(spec.table, jnp.float32)]
  if dq is not None:
    absmax2, offset = dq
    weights += [jnp.asarray(DYNAMIC_MAP_SIGNED), absmax2, offset]
  args = [lead, *weights]
  out = jax.ShapeDtypeStruct(out_shape, jnp.dtype(spec.dtype))
  return pl.pallas_call(
    functools.partial(kernel, spec=spec),
    out_shape=out,
    grid=grid,
    in_specs=[_whole(a) for a in args],
    out_specs=_whole(out),
    compiler_params=plgpu.CompilerParams(
      num_warps=spec.num_warps, num_stages=spec.num_stages
    ),
    interpret=spec.interpret,
    name="qlora_4bit_matmul",
  )(*args)


def gpu_forward(spec: Spec, x, codes, absmax, dq):
  """x [m, k] @ W.T; absmax [n, k/bs] (float32, or uint8 with dq =
  (absmax2, offset[1]))."""
  grid = (pl.cdiv(spec.m, spec.block_m), pl.cdiv(spec.n, spec.block_n))
  return _gpu_call(
    _gpu_forward_kernel, spec, grid, x, codes, absmax, dq, (spec.m, spec.n)
  )


def gpu_input_grad(spec: Spec, g, codes, absmax, dq):
  """g [m, n] @ W -> [m, k]; arguments as in `gpu_forward`."""
  grid = (pl.cdiv(spec.m, spec.block_m), pl.cdiv(spec.k, spec.block_k))
  return _gpu_call(
    _gpu_input_grad_kernel, spec, grid, g, codes, absmax, dq, (spec.m, spec.k)
  )


# TPU (Mosaic): operands padded to whole tiles, the reduction on the last
# grid axis into a VMEM accumulator; absmax arrives as float32 laid out
# [K tiles of scales, n, scales_per_tile] so that its blocks keep a whole
# minor axis.


def _tpu_planes(codes_ref, absmax_ref, spec: Spec):
  lookup = functools.partial(select_values, spec.table)
  return _planes(
    codes_ref[...], absmax_ref[...], spec, lookup, _expand_by_select
  )


def _accumulate(acc_refs, parts, o_refs):
  step = pl.program_id(2)

  @pl.when(step == 0)
  def _():
    for acc in acc_refs:
      acc[...] = jnp.zeros(acc.shape, acc.dtype)

  for acc, part in zip(acc_refs, parts, strict=True):
    acc[...] += part

  @pl.when(step == pl.num_programs(2) - 1)
  def _():
    for o, acc in zip(o_refs, acc_refs, strict=True):
      o[...] = acc[...].astype(o.dtype)


def _tpu_forward_body(
  xe_ref, xo_ref, codes_ref, absmax_ref, o_ref, acc_ref, *, spec
):
  w_hi, w_lo = _tpu_planes(codes_ref, absmax_ref, spec)
  part = _dot(xe_ref[...], w_hi, 1) + _dot(xo_ref[...], w_lo, 1)
  _accumulate([acc_ref], [part], [o_ref])


def _tpu_input_grad_body(
  g_ref, codes_ref, absmax_ref, hi_ref, lo_ref, acc_hi, acc_lo, *, spec
):
  w_hi, w_lo = _tpu_planes(codes_ref, absmax_ref, spec)
  g = g_ref[...]
  parts = [_dot(g, w_hi, 0), _dot(g, w_lo, 0)]
  _accumulate([acc_hi, acc_lo], parts, [hi_ref, lo_ref])


def _tpu_params():
  return pltpu.CompilerParams(
    dimension_semantics=("parallel", "parallel", "arbitrary")
  )


def tpu_forward(spec: Spec, x_even, x_odd, codes, absmax):
  """Padded planes x_even, x_odd [mp, kp/2] @ W.T -> [mp, np]."""
  bm, bn, half = spec.block_m, spec.block_n, spec.block_k // 2
  mp, np_ = x_even.shape[0], codes.shape[0]
  tps, spt = spec.tiles_per_scale, spec.scales_per_tile
  grid = (mp // bm, np_ // bn, codes.shape[1] // half)
  x_spec = pl.BlockSpec((bm, half), lambda i, j, k: (i, k))
  return pl.pallas_call(
    functools.partial(_tpu_forward_body, spec=spec),
    out_shape=jax.ShapeDtypeStruct((mp, np_), jnp.dtype(spec.dtype)),
    grid=grid,
    in_specs=[
      x_spec,
      x_spec,
      pl.BlockSpec((bn, half), lambda i, j, k: (j, k)),
      pl.BlockSpec(
        (pl.squeezed, bn, spt),
        lambda i, j, k: (lax.div(k, jnp.int32(tps)), j, 0),
      ),
    ],
    out_specs=pl.BlockSpec((bm, bn), lambda i, j, k: (i, j)),
    scratch_shapes=[pltpu.VMEM((bm, bn), jnp.float32)],
    compiler_params=_tpu_params(),
    interpret=spec.interpret,
    name="qlora_4bit_matmul",
  )(x_even, x_odd, codes, absmax)


def tpu_input_grad(spec: Spec, g, codes, absmax):
  """Padded g [mp, np] @ W -> the planes (g @ W_hi, g @ W_lo) [mp, kp/2]."""
  bm, bn, half = spec.block_m, spec.block_n, spec.block_k // 2
  mp, np_ = g.shape
  tps, spt = spec.tiles_per_scale, spec.scales_per_tile
  grid = (mp // bm, codes.shape[1] // half, np_ // bn)
  plane = jax.ShapeDtypeStruct((mp, codes.shape[1]), jnp.dtype(spec.dtype))
  out_spec = pl.BlockSpec((bm, half), lambda i, k, j: (i, k))
  return pl.pallas_call(
    functools.partial(_tpu_input_grad_body, spec=spec),
    out_shape=(plane, plane),
    grid=grid,
    in_specs=[
      pl.BlockSpec((bm, bn), lambda i, k, j: (i, j)),
      pl.BlockSpec((bn, half), lambda i, k, j: (j, k)),
      pl.BlockSpec(
        (pl.squeezed, bn, spt),
        lambda i, k, j: (lax.div(k, jnp.int32(tps)), j, 0),
      ),
    ],
    out_specs=(out_spec, out_spec),
    scratch_shapes=[pltpu.VMEM((bm, half), jnp.float32)] * 2,
    compiler_params=_tpu_params(),
    interpret=spec.interpret,
    name="qlora_4bit_input_grad",
  )(g, codes, absmax)
