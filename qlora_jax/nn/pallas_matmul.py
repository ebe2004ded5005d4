"""Fused 4-bit matmuls in Pallas: `x @ W.T` and `g @ W` from packed codes.

W [out, in] is a QuantizedTensor with 4-bit codes (any 16-entry table: nf4,
fp4, int4), two per byte in row-major order with the first of each pair in
the high nibble, and one absmax per block of `block_size` elements of a row
(double-quantized or not). The kernels read one tile of codes and scales at
a time, decode it next to the matmul unit and multiply: no dequantized
weight is ever written to device memory.

Nibble planes: byte j of a row holds columns 2j (high nibble) and 2j + 1
(low nibble). A tile of codes [bn, bk/2] decodes to two planes W_hi, W_lo,
and x @ W.T = x_even @ W_hi.T + x_odd @ W_lo.T, g @ W = interleave(g @ W_hi,
g @ W_lo); a plane is table[code] * absmax in float32, cast to the compute
dtype (as the XLA path does), and the dots accumulate in float32.

Two targets (the kernels live in `pallas_kernels`):
  gpu (Triton): the reduction runs as a loop inside each program (Triton
    programs cannot carry an accumulator across grid steps); x is split and
    dx interleaved in registers, ragged edges are masked loads and stores,
    and code values, the double-quantization map and absmax2 are gathered
    from small L1-resident arrays, so a call is one kernel launch.
  tpu (Mosaic): the reduction is the last grid axis ("arbitrary") with a
    float32 VMEM accumulator; codes decode by a select tree on their bits
    (Mosaic has no general vector gather); XLA reconstructs the block
    absmax (one value per block), pads operands to whole tiles and splits x
    into planes before the call, and interleaves dx after it.

Either target runs on the CPU in Pallas interpret mode (the tests check
both there against the XLA path).
"""

import contextlib
import dataclasses

import jax
import jax.numpy as jnp

from qlora_jax import quant
from qlora_jax.nn import pallas_kernels as kernels
from qlora_jax.quant.codebooks import get_data_type

TARGETS = ("gpu", "tpu")


@dataclasses.dataclass(frozen=True)
class Tiles:
  """Tile sizes: rows of x (tokens), rows of W (out), columns of W (in).

  For `x @ W.T` block_k is the reduction; for `g @ W` block_n is. Triton
  needs powers of two of at least 16 (its dot's minimum); Mosaic wants
  block_n and block_k / 2 multiples of 128 and block_m of 16 (bf16).
  num_warps and num_stages are Triton's (None: its defaults).
  """

  block_m: int
  block_n: int
  block_k: int
  num_warps: int | None = None
  num_stages: int | None = None


def unsupported_reason(qt: quant.QuantizedTensor) -> str | None:
  """Why the kernels cannot read `qt`'s layout, or None if they can."""
  if qt.ndim != 2:
    return f"the weight has shape {qt.shape}, not [out, in]"
  dt = get_data_type(qt.data_type)
  if dt.asymmetric:
    return f"data type {qt.data_type!r} is asymmetric (scale and minimum)"
  bits = dt.bits
  if bits != 4:
    return f"data type {qt.data_type!r} has {bits}-bit codes, not 4-bit"
  bs = qt.block_size
  if qt.shape[1] % bs:
    return f"blocks of {bs} cross rows of {qt.shape[1]} elements"
  if bs & (bs - 1):
    return f"block_size {bs} is not a power of two"
  return None


def default_target() -> str:
  return "tpu" if jax.default_backend() == "tpu" else "gpu"


def _pow2_at_most(n: int, cap: int, floor: int = 16) -> int:
  return max(floor, min(cap, 1 << max(0, n - 1).bit_length()))


def default_tiles(
  target: str, kind: str, m: int, n: int, k: int, block_size: int
) -> Tiles:
  """Tiles for `kind` "forward" (x @ W.T) or "input_grad" (g @ W)."""
  decode = m <= 64
  if target == "gpu":
    # Decode: one 16..64-row tile of x, narrow W tiles so that a 4096-row
    # weight spreads over ~128+ programs, long K steps to stream codes.
    # Prefill: 128x128 output tiles, K steps of 128 (64 bytes of codes).
    bm = _pow2_at_most(m, 64 if decode else 128)
    if kind == "forward":
      bn, bk = (32, 512) if decode else (128, 128)
    else:
      bn, bk = (64, 256) if decode else (64, 128)
    bn, bk = _pow2_at_most(n, bn), _pow2_at_most(k, bk, floor=32)
    bk = max(bk, min(block_size, 512))
    warps, stages = (4, 4) if decode else (8, 3)
    return Tiles(bm, bn, bk, warps, stages)
  bm = min(_round_up(m, 16), 16 if decode else 256)
  bn = min(_round_up(n, 128), 256)
  bk = min(_round_up(k, 256), 1024 if decode else 512)
  return Tiles(bm, bn, bk)


def _round_up(a: int, b: int) -> int:
  return -(-a // b) * b


def _check_tiles(tiles: Tiles, target: str, block_size: int) -> None:
  bk, bs = tiles.block_k, block_size
  if bk % 2 or (bk % bs and bs % bk):
    raise ValueError(
      f"tiles.block_k={bk}: must be even and a multiple or a divisor of the "
      f"block size {bs}"
    )
  if target == "gpu":
    for name in ("block_m", "block_n", "block_k"):
      v = getattr(tiles, name)
      if v < 16 or v & (v - 1):
        raise ValueError(f"tiles.{name}={v}: Triton needs a power of 2 >= 16")


# Set by `lowering_for`: the kernels' target while lowering for a platform
# this process has no device of (jax.export from the CPU).
_LOWERING_TARGET: str | None = None
PLATFORM_TARGETS = {"cuda": "gpu", "rocm": "gpu", "tpu": "tpu"}


@contextlib.contextmanager
def lowering_for(platform: str):
  """Within: the kernels are built for `platform` ("cuda", "rocm", "tpu"),
  not interpreted, and `matmul.resolve_kernel("auto")` picks them, so that
  `jax.export(..., platforms=[platform])` on a CPU-only machine lowers the
  program that device would run (Triton as an `__gpu$xla.gpu.triton` call,
  Mosaic as a `tpu_custom_call`)."""
  global _LOWERING_TARGET
  if platform not in PLATFORM_TARGETS:
    raise ValueError(
      f"platform {platform!r}: expected one of {sorted(PLATFORM_TARGETS)}"
    )
  before, _LOWERING_TARGET = _LOWERING_TARGET, PLATFORM_TARGETS[platform]
  try:
    yield
  finally:
    _LOWERING_TARGET = before


def lowering_target() -> str | None:
  """The target of an active `lowering_for`, else None."""
  return _LOWERING_TARGET


def _setup(qt, dtype, target, tiles, interpret, kind, m):
  reason = unsupported_reason(qt)
  if reason is not None:
    raise ValueError(f"Pallas 4-bit matmul: {reason}")
  target = target or _LOWERING_TARGET or default_target()
  if target not in TARGETS:
    raise ValueError(f"target {target!r}: expected one of {TARGETS}")
  n, k = qt.shape
  tiles = tiles or default_tiles(target, kind, m, n, k, qt.block_size)
  _check_tiles(tiles, target, qt.block_size)
  if interpret is None:
    on_device = jax.default_backend() in ("gpu", "tpu")
    interpret = not on_device and _LOWERING_TARGET is None
  table = tuple(float(v) for v in get_data_type(qt.data_type).values)
  spec = kernels.Spec(
    m=m,
    n=n,
    k=k,
    block_size=qt.block_size,
    block_m=tiles.block_m,
    block_n=tiles.block_n,
    block_k=tiles.block_k,
    table=table,
    dtype=jnp.dtype(dtype).name,
    num_warps=tiles.num_warps,
    num_stages=tiles.num_stages,
    interpret=bool(interpret),
  )
  return target, spec


def _gpu_operands(qt):
  """Codes [n, k/2], absmax [n, k/bs] and the double-quantization
  (absmax2, offset[1]) or None, as the Triton kernels read them."""
  n, k = qt.shape
  codes = qt.codes.reshape(n, k // 2)
  absmax = qt.absmax.reshape(n, k // qt.block_size)
  dq = (qt.absmax2, qt.offset.reshape(1)) if qt.double_quant else None
  return codes, absmax, dq


def _tpu_operands(qt, spec: kernels.Spec):
  """Codes [Np, Kp/2] and absmax [Kp/(bs*spt), Np, spt], padded to tiles."""
  n, k, bs = spec.n, spec.k, spec.block_size
  n_pad = _round_up(n, spec.block_n) - n
  k_pad = _round_up(k, spec.block_k) - k
  codes = jnp.pad(qt.codes.reshape(n, k // 2), ((0, n_pad), (0, k_pad // 2)))
  absmax = quant.block_absmax(qt).reshape(n, k // bs)
  absmax = jnp.pad(absmax, ((0, n_pad), (0, k_pad // bs)))
  spt = spec.scales_per_tile
  absmax = absmax.reshape(n + n_pad, -1, spt).transpose(1, 0, 2)
  return codes, absmax


def _pad2(a, rows: int, cols: int):
  return jnp.pad(a, ((0, rows - a.shape[0]), (0, cols - a.shape[1])))


def matmul(
  x: jnp.ndarray,
  qt: quant.QuantizedTensor,
  dtype,
  *,
  target: str | None = None,
  tiles: Tiles | None = None,
  interpret: bool | None = None,
) -> jnp.ndarray:
  """x [..., in] @ dequantize(qt).T -> [..., out] in `dtype`.

  target: "gpu" (Triton) or "tpu" (Mosaic); default by the backend, "gpu"
  on the CPU. interpret: Pallas interpret mode; default on the CPU.
  """
  lead = x.shape[:-1]
  x = x.reshape(-1, x.shape[-1]).astype(dtype)
  m = x.shape[0]
  target, spec = _setup(qt, dtype, target, tiles, interpret, "forward", m)
  if target == "gpu":
    codes, absmax, dq = _gpu_operands(qt)
    y = kernels.gpu_forward(spec, x, codes, absmax, dq)
  else:
    codes, absmax = _tpu_operands(qt, spec)
    mp, kp = _round_up(m, spec.block_m), _round_up(spec.k, spec.block_k)
    xp = _pad2(x, mp, kp)
    y = kernels.tpu_forward(spec, xp[:, 0::2], xp[:, 1::2], codes, absmax)
    y = y[:m, : spec.n]
  return y.reshape(*lead, spec.n)


def input_grad(
  g: jnp.ndarray,
  qt: quant.QuantizedTensor,
  dtype,
  *,
  target: str | None = None,
  tiles: Tiles | None = None,
  interpret: bool | None = None,
) -> jnp.ndarray:
  """g [..., out] @ dequantize(qt) -> [..., in] in `dtype` (the input
  gradient of `matmul`); arguments as in `matmul`."""
  lead = g.shape[:-1]
  g = g.reshape(-1, g.shape[-1]).astype(dtype)
  m = g.shape[0]
  target, spec = _setup(qt, dtype, target, tiles, interpret, "input_grad", m)
  if target == "gpu":
    codes, absmax, dq = _gpu_operands(qt)
    dx = kernels.gpu_input_grad(spec, g, codes, absmax, dq)
  else:
    codes, absmax = _tpu_operands(qt, spec)
    mp, np_ = _round_up(m, spec.block_m), _round_up(spec.n, spec.block_n)
    hi, lo = kernels.tpu_input_grad(spec, _pad2(g, mp, np_), codes, absmax)
    dx = jnp.stack([hi, lo], axis=-1).reshape(mp, -1)[:m, : spec.k]
  return dx.reshape(*lead, spec.k)


def bytes_moved(qt: quant.QuantizedTensor, m: int, dtype) -> int:
  """Bytes a fused `matmul` must read and write at least: codes, scales,
  x and y (for bandwidth figures)."""
  n, k = qt.shape
  itemsize = jnp.dtype(dtype).itemsize
  return qt.nbytes + (m * k + m * n) * itemsize


def flops(m: int, n: int, k: int) -> int:
  return 2 * m * n * k


__all__ = [
  "TARGETS",
  "Tiles",
  "bytes_moved",
  "default_target",
  "default_tiles",
  "flops",
  "input_grad",
  "matmul",
  "unsupported_reason",
]
