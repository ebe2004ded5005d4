"""A fused 4-bit `x @ W.T` for the CPU: a C++ kernel called through XLA's FFI.

XLA:CPU writes a dequantized weight to memory before its dot, so a 4-bit
matmul over a few tokens (decoding) reads the weight as floats anyway and
costs more than a float one. This kernel (`cpu_kernel/matmul4.cc`) decodes
the packed codes in registers, one block's 16 scaled table values at a time,
and multiplies as it goes: it reads 4.5 bits per weight and never writes W.

W [out, in] is a QuantizedTensor with a 16-entry table (nf4, fp4, int4, or
GGML Q4_1's int4_asym with its per-block minimum), rows made of whole blocks
of a multiple of 32 elements; the block scales (double-quantized or not)
are reconstructed by XLA before the call ([out, in / block], float32). Each
weight the kernel multiplies is bit-identical to the XLA path's
dequantized float32 weight; the products are summed in float32 in another
order (the results agree to float32 rounding).

The kernel is built on first use with the machine's C++ compiler (g++ or
$CXX) for its own CPU (`-march=native`: AVX-512, else AVX2, else plain
C++), against the FFI headers that jaxlib ships, and cached in
$QLORA_JAX_CACHE/kernels (default ~/.cache/qlora_jax/kernels) under a hash
of its source, flags and jaxlib version, with its own sha256 recorded
beside it (`.so.sha256`). A cached library is loaded only when it matches
that record; one that does not (cut short, replaced) is compiled again.
Without a compiler, or when a build fails or does not load, `unavailable()`
says why, a warning says so once, and the "auto" kernel stays with XLA.

It is a forward kernel only: `nn.matmul` uses it for matmuls over at most
`MAX_TOKENS` tokens that are not differentiated (decoding and short
prompts); training and long prompts keep the XLA path.

The same library holds a Q8_0 kernel (`cpu_kernel/q8_0.cc`,
`matmul_q8_0`): int8 codes with a float16 scale per block of 32, GGML's
layout for a decoding head, each weight d * q exact in float32.
"""

import ctypes
import functools
import hashlib
import os
import pathlib
import shutil
import subprocess
import tempfile

import jax
import jax.numpy as jnp
import jaxlib
import numpy as np
from absl import logging

from qlora_jax import quant
from qlora_jax.quant.codebooks import get_data_type

SOURCE = pathlib.Path(__file__).parent / "cpu_kernel" / "matmul4.cc"
# Compiled together into one library.
SOURCES = (SOURCE, SOURCE.with_name("q8_0.cc"))
# Instruction sets a build can target: "native" (this CPU's best), and two
# fixed ones for checking the other code paths on an AVX-512 machine.
ISAS = {
  "native": ["-march=native"],
  "avx2": ["-march=x86-64-v3"],
  "generic": ["-march=x86-64"],
}
# Matmuls over more tokens than this use XLA's dequantize-then-dot, whose
# dot kernel is faster once the weight is reused across many rows.
MAX_TOKENS = 32
STEP = 32  # columns the kernel decodes per step


def cache_dir() -> pathlib.Path:
  root = os.environ.get("QLORA_JAX_CACHE") or (
    pathlib.Path.home() / ".cache/qlora_jax"
  )
  return pathlib.Path(root) / "kernels"


def _compiler() -> str | None:
  return os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")


def _flags(isa: str) -> list[str]:
  return [
    "-O3",
    "-std=c++17",
    "-shared",
    "-fPIC",
    # The XLA path rounds table * scale and + minimum separately: no FMA
    # contraction of those, so the kernel's weights are the same floats.
    "-ffp-contract=off",
    *ISAS[isa],
    f"-I{jax.ffi.include_dir()}",
  ]


class BuildError(RuntimeError):
  """The kernel could not be built (no compiler, or it failed) or loaded."""


def _sha256(path: pathlib.Path) -> str:
  return hashlib.sha256(path.read_bytes()).hexdigest()


def _record(lib: pathlib.Path) -> pathlib.Path:
  return lib.with_name(lib.name + ".sha256")


def _verified(lib: pathlib.Path) -> bool:
  """Whether `lib` exists and matches the sha256 recorded beside it; one
  that does not match is named in a warning."""
  if not lib.exists():
    return False
  try:
    recorded = _record(lib).read_text().strip()
  except OSError:
    recorded = None
  if recorded == _sha256(lib):
    return True
  if recorded is None:  # a cache from before records were kept
    logging.info("%s has no recorded sha256: compiling it again", lib)
  else:
    logging.warning(
      "%s does not match its recorded sha256 (cut short or replaced): "
      "compiling it again",
      lib,
    )
  return False


def _write_record(lib: pathlib.Path, digest: str) -> None:
  fd, tmp = tempfile.mkstemp(suffix=".sha256", dir=lib.parent)
  with os.fdopen(fd, "w") as f:
    f.write(digest + "\n")
  os.replace(tmp, _record(lib))


@functools.cache
def build(isa: str = "native") -> pathlib.Path:
  """The shared library of the kernel for `isa`, compiled if not cached
  (or cached but not matching its recorded sha256).

  Raises:
    BuildError: no C++ compiler, or the compile failed (its output).
  """
  if isa not in ISAS:
    raise ValueError(f"isa {isa!r}: expected one of {sorted(ISAS)}")
  cxx = _compiler()
  if cxx is None:
    raise BuildError("no C++ compiler (g++ or $CXX) on PATH")
  flags = _flags(isa)
  key = hashlib.sha256()
  sources = tuple(path.read_bytes() for path in SOURCES)
  for part in (*sources, cxx, *flags, jaxlib.__version__):
    key.update(part if isinstance(part, bytes) else part.encode())
  lib = cache_dir() / f"matmul4_{isa}_{key.hexdigest()[:16]}.so"
  if _verified(lib):
    return lib
  lib.parent.mkdir(parents=True, exist_ok=True)
  # Compile to a private name, then rename: processes building at once
  # (test workers) never load a half-written file.
  fd, tmp = tempfile.mkstemp(suffix=".so", dir=lib.parent)
  os.close(fd)
  try:
    try:
      proc = subprocess.run(
        [cxx, *flags, *map(str, SOURCES), "-o", tmp],
        capture_output=True,
        text=True,
        check=False,
      )
    except OSError as e:  # $CXX names no program, or not an executable
      raise BuildError(f"running the C++ compiler {cxx!r} failed: {e}") from e
    if proc.returncode != 0:
      raise BuildError(
        f"compiling {', '.join(p.name for p in SOURCES)} with {cxx} "
        f"failed:\n{proc.stderr[-2000:]}"
      )
    # The record first: a reader never pairs the new library with an old
    # record (at worst it compiles once more).
    _write_record(lib, _sha256(pathlib.Path(tmp)))
    os.replace(tmp, lib)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)
  return lib


def _symbol(isa: str, name: str):
  """The function `name` of the build for `isa`, loaded.

  Raises:
    BuildError: the library does not load or lacks `name`.
  """
  path = build(isa)
  try:
    return getattr(ctypes.cdll.LoadLibrary(str(path)), name)
  except (OSError, AttributeError) as e:
    raise BuildError(f"{path} does not load as the kernel: {e}") from e


@functools.cache
def target(isa: str = "native") -> str:
  """The FFI target name of the kernel built for `isa`, registered with
  XLA's CPU platform (built first if needed)."""
  kernel = _symbol(isa, "QloraMatmul4")
  name = f"qlora_matmul4_{isa}"
  jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(kernel), platform="cpu")
  return name


@functools.cache
def target_q8_0(isa: str = "native") -> str:
  """The FFI target name of the Q8_0 kernel built for `isa`, registered
  with XLA's CPU platform (built first if needed)."""
  kernel = _symbol(isa, "QloraMatmulQ8_0")
  name = f"qlora_matmul_q8_0_{isa}"
  jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(kernel), platform="cpu")
  return name


@functools.cache
def isa_of(isa: str = "native") -> str:
  """The instruction set the build for `isa` uses: avx512, avx2, generic."""
  which = _symbol(isa, "qlora_matmul4_isa")
  which.restype = ctypes.c_char_p
  return which().decode()


@functools.cache
def unavailable() -> str | None:
  """Why the kernel cannot run in this process, or None if it can (a
  reason is also logged once, as a warning: 4-bit matmuls use XLA)."""
  try:
    target()
    target_q8_0()
  except (BuildError, OSError) as e:
    logging.warning("the CPU kernel is unavailable, XLA runs instead: %s", e)
    return str(e)
  return None


def unsupported_reason(qt: quant.QuantizedTensor) -> str | None:
  """Why the kernel cannot read `qt`'s layout, or None if it can."""
  if qt.ndim != 2:
    return f"the weight has shape {qt.shape}, not [out, in]"
  dt = get_data_type(qt.data_type)
  if dt.bits != 4:
    return f"data type {qt.data_type!r} has {dt.bits}-bit codes, not 4-bit"
  bs = qt.block_size
  if qt.shape[1] % bs:
    return f"blocks of {bs} cross rows of {qt.shape[1]} elements"
  if bs % STEP:
    return f"block_size {bs} is not a multiple of {STEP}"
  return None


def _table(data_type: str) -> np.ndarray:
  values = np.asarray(get_data_type(data_type).values, np.float32)
  return np.pad(values, (0, 16 - values.size))


def matmul(
  x: jnp.ndarray, qt: quant.QuantizedTensor, dtype, isa: str = "native"
) -> jnp.ndarray:
  """x [..., in] @ dequantize(qt).T -> [..., out] in `dtype`, by the kernel
  (x is read in float32 and the products are summed in float32)."""
  out_f, in_f = qt.shape
  x2 = x.reshape(-1, in_f).astype(jnp.float32)
  codes = qt.codes.reshape(out_f, in_f // 2)
  nb = in_f // qt.block_size
  scale = quant.block_absmax(qt).astype(jnp.float32).reshape(out_f, nb)
  has_min = qt.minimum is not None
  if has_min:
    minimum = qt.minimum.astype(jnp.float32).reshape(out_f, nb)
  else:
    minimum = jnp.zeros((1,), jnp.float32).reshape(1, 1)
  call = jax.ffi.ffi_call(
    target(isa),
    jax.ShapeDtypeStruct((x2.shape[0], out_f), jnp.float32),
    vmap_method="sequential",
  )
  y = call(
    x2,
    codes,
    scale,
    minimum,
    jnp.asarray(_table(qt.data_type)),
    has_minimum=np.int64(has_min),
  )
  return y.reshape(*x.shape[:-1], out_f).astype(dtype)


def matmul_q8_0(
  x: jnp.ndarray, w: quant.Q8_0Tensor, isa: str = "native"
) -> jnp.ndarray:
  """x [..., in] @ dequantize_q8_0(w).T -> float32 [..., out], by the Q8_0
  kernel (x is read in float32 and the products are summed in float32)."""
  out_f, in_f = w.codes.shape
  if x.shape[-1] != in_f or in_f % quant.q8_0.BLOCK:
    raise ValueError(
      f"matmul_q8_0: x {x.shape} against a Q8_0 weight {w.codes.shape}"
    )
  x2 = x.reshape(-1, in_f).astype(jnp.float32)
  bits = jax.lax.bitcast_convert_type(w.scales.astype(jnp.float16), jnp.uint16)
  call = jax.ffi.ffi_call(
    target_q8_0(isa),
    jax.ShapeDtypeStruct((x2.shape[0], out_f), jnp.float32),
    vmap_method="sequential",
  )
  y = call(x2, w.codes.astype(jnp.int8), bits)
  return y.reshape(*x.shape[:-1], out_f)
