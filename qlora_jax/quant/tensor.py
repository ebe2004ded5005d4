"""QuantizedTensor: packed k-bit codes and block scales as one pytree."""

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from qlora_jax.quant import blockwise, packing
from qlora_jax.quant.codebooks import DataType, get_data_type

MAX_BLOCK_SIZE = 4096
_FLOAT_DTYPES = ("float32", "bfloat16", "float16")


class SpecError(ValueError):
  """A spec field out of its range; `field` names it ("block_size").

  The layer that reads a config prefixes its section ("quant.block_size").
  """

  def __init__(self, field: str, reason: str):
    super().__init__(f"{field}: {reason}")
    self.field = field
    self.reason = reason


@dataclasses.dataclass(frozen=True)
class QuantSpec:
  """How to quantize a tensor: data type, block size, double quantization.

  The one owner of these fields' rules: every other layer builds a
  QuantSpec and lets it raise (`SpecError`, naming the field).
  """

  data_type: str = "nf4"
  block_size: int = 64
  double_quant: bool = True

  def __post_init__(self):
    try:
      dt = get_data_type(self.data_type)
    except ValueError as e:
      raise SpecError("data_type", str(e)) from None
    check_block_size(self.block_size)
    if not isinstance(self.double_quant, (bool, np.bool_)):
      raise SpecError(
        "double_quant", f"expected a bool, got {self.double_quant!r}"
      )
    if dt.asymmetric and self.double_quant:
      raise SpecError(
        "double_quant",
        f"data type {dt.name!r} stores a float16 scale and minimum per "
        "block (GGML Q4_1's layout for int4_asym); set double_quant to False",
      )

  @property
  def asymmetric(self) -> bool:
    return get_data_type(self.data_type).asymmetric


def check_block_size(block_size: Any) -> None:
  if (
    isinstance(block_size, bool)
    or not isinstance(block_size, (int, np.integer))
    or block_size <= 0
    or block_size % 2
    or block_size > MAX_BLOCK_SIZE
  ):
    raise SpecError(
      "block_size",
      f"must be a positive multiple of 2 up to {MAX_BLOCK_SIZE}, "
      f"got {block_size!r}",
    )


@functools.partial(
  jax.tree_util.register_dataclass,
  data_fields=["codes", "absmax", "absmax2", "offset", "minimum"],
  meta_fields=["shape", "data_type", "block_size", "dtype"],
)
@dataclasses.dataclass(frozen=True)
class QuantizedTensor:
  """A tensor stored as packed k-bit codes plus per-block absmax scales.

  The tensor is quantized as its flattened row-major sequence (bitsandbytes'
  layout). Array fields are pytree leaves; the rest is static metadata.
  An asymmetric data type (`int<k>_asym`) stores a scale d in `absmax` and
  a minimum m in `minimum` per block, and means d * q + m.

  Attributes:
    codes: uint8, the packed codes of the flattened tensor.
    absmax: float32 per block, or uint8 second-level codes (double quant);
      for an asymmetric type the float16 scale d per block.
    absmax2: float32 per group of 256 blocks (double quant), else None.
    offset: float32 scalar, the mean block absmax (double quant), else None.
    shape: shape of the original tensor.
    data_type: name of the k-bit data type ("nf4", "int3", ...).
    block_size: elements per block.
    dtype: name of the original float dtype (the default dequantize dtype).
    minimum: the minimum m per block of an asymmetric type (float16 as
      quantized; float32 after an exact QA-LoRA merge), else None.
  """

  codes: jax.Array
  absmax: jax.Array
  absmax2: jax.Array | None
  offset: jax.Array | None
  shape: tuple[int, ...]
  data_type: str
  block_size: int
  dtype: str
  minimum: jax.Array | None = None

  @property
  def double_quant(self) -> bool:
    return self.absmax2 is not None

  @property
  def size(self) -> int:
    return int(np.prod(self.shape, dtype=np.int64))

  @property
  def ndim(self) -> int:
    return len(self.shape)

  @property
  def spec(self) -> QuantSpec:
    return QuantSpec(self.data_type, self.block_size, self.double_quant)

  @property
  def nbytes(self) -> int:
    leaves = jax.tree_util.tree_leaves(self)
    return int(sum(np.prod(a.shape) * a.dtype.itemsize for a in leaves))


class NonFiniteError(ValueError):
  """A tensor given to `quantize` holds NaN or infinity."""


def _check_dtype(x: Any, name: str | None) -> Any:
  dtype = getattr(x, "dtype", None)
  if dtype is None:
    x = np.asarray(x)
    dtype = x.dtype
  if jnp.dtype(dtype).name not in _FLOAT_DTYPES:
    raise ValueError(
      f"cannot quantize {_what(name)} of dtype {jnp.dtype(dtype).name}: "
      f"expected one of {', '.join(_FLOAT_DTYPES)}"
    )
  return x


def _what(name: str | None) -> str:
  return f"tensor {name!r}" if name else "input"


# The largest magnitude an asymmetric type stores: its scale and minimum
# are float16.
ASYM_MAX = float(np.finfo(np.float16).max)


def _raise_non_finite(x: Any, name: str | None) -> None:
  bad = np.argwhere(~np.isfinite(np.asarray(x, np.float32)))
  raise NonFiniteError(
    f"cannot quantize {_what(name)}: {len(bad)} non-finite value(s), the "
    f"first at index {tuple(int(i) for i in bad[0])}"
  )


@functools.partial(
  jax.jit, static_argnames=("data_type", "block_size", "double_quant")
)
def _quantize(x, data_type: str, block_size: int, double_quant: bool):
  """(codes, absmax, absmax2, offset, minimum, all values finite, largest
  magnitude of an asymmetric type else 0)."""
  dt = get_data_type(data_type)
  finite = jnp.isfinite(x).all()  # fuses with the pass over x
  if dt.asymmetric:
    codes, scale, minimum = blockwise.quantize_asym_blocks(
      x.reshape(-1), dt.bits, block_size
    )
    packed = packing.pack(codes, dt.bits, pad_code=0)
    top = jnp.max(jnp.abs(x)).astype(jnp.float32)
    return packed, scale, None, None, minimum, finite, top
  top = jnp.zeros((), jnp.float32)
  codes, absmax = blockwise.quantize_blocks(x.reshape(-1), dt, block_size)
  packed = packing.pack(codes, dt.bits, pad_code=dt.zero_code)
  if not double_quant:
    return packed, absmax, None, None, None, finite, top
  q8, absmax2, offset = blockwise.double_quantize(absmax)
  return packed, q8, absmax2, offset, None, finite, top


def quantize(
  x: Any,
  data_type: str = "nf4",
  block_size: int = 64,
  double_quant: bool = False,
  name: str | None = None,
) -> QuantizedTensor:
  """Quantizes a float tensor blockwise into a QuantizedTensor.

  Args:
    x: float32, bfloat16 or float16 array of any shape.
    data_type: "nf4", "fp4", "fp8", or "nf<k>" / "int<k>" /
      "int<k>_asym", k in 2,3,4,5,6,8.
    block_size: elements per absmax block, a multiple of 2 up to 4096.
    double_quant: quantize the block absmax again (bitsandbytes'
      `compress_statistics`).
    name: the tensor's name, for error messages.

  Every finite float32 value is quantized by the symmetric types (the
  result never holds NaN); an asymmetric type stores float16 scales and
  minimums, so it refuses magnitudes beyond 65504 (`ASYM_MAX`).

  Raises:
    ValueError: unknown data type, bad block size, non-float input, or
      (a concrete input, asymmetric type) a magnitude beyond `ASYM_MAX`.
    NonFiniteError: (a ValueError) a concrete input holds NaN or infinity.
  """
  dt = get_data_type(data_type)
  QuantSpec(dt.name, block_size, bool(double_quant))  # checks the options
  x = _check_dtype(x, name)
  shape = tuple(int(d) for d in x.shape)
  if not shape or int(np.prod(shape)) == 0:
    raise ValueError(
      f"cannot quantize {_what(name)} of shape {shape}: it needs at least "
      "one element"
    )
  codes, absmax, absmax2, offset, minimum, finite, top = _quantize(
    jnp.asarray(x), dt.name, int(block_size), bool(double_quant)
  )
  if not isinstance(x, jax.core.Tracer):
    if not bool(finite):
      _raise_non_finite(x, name)
    if float(top) > ASYM_MAX:
      raise ValueError(
        f"cannot quantize {_what(name)} as {dt.name}: its largest magnitude "
        f"{float(top):.4g} is beyond {ASYM_MAX:g}, the float16 scale and "
        "minimum of each block cannot hold it (use a symmetric type such "
        "as nf4, which takes any float32)"
      )
  return QuantizedTensor(
    codes,
    absmax,
    absmax2,
    offset,
    shape=shape,
    data_type=dt.name,
    block_size=int(block_size),
    dtype=jnp.dtype(x.dtype).name,
    minimum=minimum,
  )


@jax.jit
def block_absmax(qt: QuantizedTensor) -> jnp.ndarray:
  """The float32 absmax of every block (reconstructed if double-quantized);
  the scale d of an asymmetric type."""
  if qt.absmax2 is None:
    return qt.absmax.astype(jnp.float32)
  return blockwise.dequantize_absmax(qt.absmax, qt.absmax2, qt.offset)


def dequantize(qt: QuantizedTensor, dtype: Any = None) -> jnp.ndarray:
  """Back to floats: table value times block absmax in float32, then cast."""
  out_dtype = jnp.dtype(dtype if dtype is not None else qt.dtype)
  return _dequantize(qt, out_dtype)


@functools.partial(jax.jit, static_argnames=("dtype",))
def _dequantize(qt: QuantizedTensor, dtype) -> jnp.ndarray:
  dt: DataType = get_data_type(qt.data_type)
  codes = packing.unpack(qt.codes, dt.bits, qt.size)
  if dt.asymmetric:
    values = blockwise.dequantize_asym_blocks(
      codes, qt.absmax, qt.minimum, qt.block_size
    )
    return values.astype(dtype).reshape(qt.shape)
  values = blockwise.dequantize_blocks(
    codes, block_absmax(qt), dt, qt.block_size
  )
  return values.astype(dtype).reshape(qt.shape)


@dataclasses.dataclass(frozen=True)
class MemoryReport:
  """Storage of a quantized tensor, scales included."""

  num_params: int
  code_bytes: int
  scale_bytes: int

  @property
  def total_bytes(self) -> int:
    return self.code_bytes + self.scale_bytes

  @property
  def bits_per_param(self) -> float:
    return 8.0 * self.total_bytes / self.num_params


def memory_report(qt: QuantizedTensor) -> MemoryReport:
  """Bytes of codes and scales and bits per parameter of `qt`."""

  def nbytes(a):
    return 0 if a is None else int(np.prod(a.shape)) * a.dtype.itemsize

  scales = nbytes(qt.absmax) + nbytes(qt.absmax2) + nbytes(qt.offset)
  scales += nbytes(qt.minimum)
  return MemoryReport(qt.size, nbytes(qt.codes), scales)


def expected_bits_per_param(spec: QuantSpec) -> float:
  """Asymptotic bits/param of a spec (large tensors): codes plus scales."""
  bits = get_data_type(spec.data_type).bits
  if spec.asymmetric:  # float16 d and m per block
    return bits + 32.0 / spec.block_size
  if not spec.double_quant:
    return bits + 32.0 / spec.block_size
  return (
    bits + 8.0 / spec.block_size + 32.0 / (spec.block_size * blockwise.DQ_GROUP)
  )
