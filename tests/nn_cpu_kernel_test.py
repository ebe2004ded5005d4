"""The fused 4-bit C++ kernel for the CPU (`nn.cpu_matmul`), built for each
of its instruction-set paths, against the XLA path (dequantize, then dot).

Tolerances: the kernel multiplies by the very float32 weights the XLA path
materializes (same table, same two roundings) and sums the products in
float32 in another order, so the outputs agree to float32 rounding of the
sums: 1e-5 relative to the largest output (sums of at most 512 products).
A float64 product of the same weights bounds both.
"""

import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qlora_jax import models, quant
from qlora_jax import nn as qnn
from qlora_jax.nn import cpu_matmul

pytestmark = pytest.mark.skipif(
  cpu_matmul.unavailable() is not None,
  reason=f"the C++ kernel does not build here: {cpu_matmul.unavailable()}",
)

# (data type, block size, double quant, columns): every 16-entry table,
# with and without DQ, blocks of 32, 64 and 128 (several steps of 32
# columns per block, rows of an odd number of blocks).
LAYOUTS = [
  ("nf4", 64, True, 320),
  ("nf4", 128, False, 256),
  ("fp4", 32, False, 256),
  ("int4", 32, True, 96),
]


def _rel_err(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.abs(a - b).max() / np.abs(b).max())


def _weight(data_type, bs, dq, n=13, k=256, seed=0):
  w = jax.random.normal(jax.random.key(seed), (n, k), jnp.float32)
  return quant.quantize(w, data_type=data_type, block_size=bs, double_quant=dq)


@pytest.fixture(scope="module", params=["native", "avx2", "generic"])
def isa(request):
  try:
    cpu_matmul.build(request.param)
  except cpu_matmul.BuildError as e:  # an old compiler without -march=x86-64-v3
    pytest.skip(f"isa {request.param}: {e}")
  # Each build takes its own code path; native, this CPU's best.
  expected = {"avx2": "avx2", "generic": "generic", "native": _best_isa()}
  assert cpu_matmul.isa_of(request.param) == expected[request.param]
  return request.param


def _best_isa() -> str:
  """The widest path this CPU runs, from the kernel's /proc/cpuinfo flags."""
  cpuinfo = pathlib.Path("/proc/cpuinfo")
  if not cpuinfo.exists():
    pytest.skip("no /proc/cpuinfo to read the CPU's instruction sets from")
  flags = set(cpuinfo.read_text().split())
  if "avx512f" in flags:
    return "avx512"
  return "avx2" if {"avx2", "fma"} <= flags else "generic"


@pytest.mark.parametrize("data_type,bs,dq,k", LAYOUTS)
def test_kernel_matches_the_dequantized_weight(isa, data_type, bs, dq, k):
  """Rows of x 1..9 (every tile width and its tails), 13 rows of W (tiles
  of 4 and 2 and a remainder): each isa's build against x @ W.T with W the
  XLA path's float32 dequantization, and against float64."""
  qt = _weight(data_type, bs, dq, k=k)
  w = quant.dequantize(qt, jnp.float32)
  for m in (1, 2, 3, 5, 9):
    x = jax.random.normal(jax.random.key(m), (m, qt.shape[1]), jnp.float32)
    y = cpu_matmul.matmul(x, qt, jnp.float32, isa=isa)
    assert y.shape == (m, qt.shape[0]) and y.dtype == jnp.float32
    ref64 = np.asarray(x, np.float64) @ np.asarray(w, np.float64).T
    assert _rel_err(y, ref64) < 1e-5, (isa, m)
    assert _rel_err(y, jnp.dot(x, w.T, precision="highest")) < 1e-5


@pytest.mark.parametrize(
  "data_type,bs,dq,k", [*LAYOUTS, ("int4_asym", 64, False, 192)]
)
def test_each_weight_is_the_xla_paths_float_exactly(isa, data_type, bs, dq, k):
  """x = one-hot rows: every output is one weight times 1 plus zeros, so
  the kernel's column j of W equals the XLA path's dequantized float32
  column bit for bit (no tolerance): the same table, scale and roundings."""
  qt = _weight(data_type, bs, dq, k=k, seed=11)
  w = np.asarray(quant.dequantize(qt, jnp.float32))
  cols = np.arange(0, k, 7)
  x = np.zeros((cols.size, k), np.float32)
  x[np.arange(cols.size), cols] = 1.0
  y = np.asarray(cpu_matmul.matmul(jnp.asarray(x), qt, jnp.float32, isa=isa))
  np.testing.assert_array_equal(y, w[:, cols].T)


def test_kernel_reads_a_per_block_minimum(isa):
  """GGML Q4_1's layout (int4_asym): d * q + m per block, m read too
  (blocks of 32 and of 64)."""
  for bs, k in ((32, 128), (64, 192)):
    qt = _weight("int4_asym", bs, False, n=6, k=k, seed=3)
    assert qt.minimum is not None
    w = quant.dequantize(qt, jnp.float32)
    x = jax.random.normal(jax.random.key(4), (4, k), jnp.float32)
    y = cpu_matmul.matmul(x, qt, jnp.float32, isa=isa)
    ref = np.asarray(x, np.float64) @ np.asarray(w, np.float64).T
    assert _rel_err(y, ref) < 1e-5, bs


def test_large_call_shared_over_threads_equals_one_thread():
  """A call above the parallel threshold (rows of W handed out in chunks
  among XLA's threads): every row computed once, the same sums as the
  XLA path within the float32 tolerance, leading batch axes kept."""
  qt = _weight("nf4", 64, True, n=300, k=512, seed=5)
  w = quant.dequantize(qt, jnp.float32)
  x = jax.random.normal(jax.random.key(6), (2, 3, 512), jnp.float32)
  y = jax.jit(lambda x: cpu_matmul.matmul(x, qt, jnp.float32))(x)
  assert y.shape == (2, 3, 300)
  ref = np.einsum("abk,nk->abn", np.asarray(x, np.float64), np.asarray(w))
  assert _rel_err(y, ref) < 1e-5


def test_resolve_kernel_and_reasons():
  qt4 = _weight("nf4", 64, True)
  assert jax.default_backend() == "cpu" and jax.device_count() == 1
  assert qnn.resolve_kernel("auto", qt4) == "cpu"
  assert qnn.resolve_kernel("cpu", qt4) == "cpu"
  qt3 = quant.quantize(jnp.ones((8, 64)), data_type="nf3", block_size=64)
  qt16 = quant.quantize(jnp.ones((8, 64)), data_type="nf4", block_size=16)
  qt_cross = quant.quantize(jnp.ones((4, 96)), data_type="nf4", block_size=64)
  for qt, reason in (
    (qt3, "3-bit codes"),
    (qt16, "block_size 16 is not a multiple of 32"),
    (qt_cross, "cross rows"),
  ):
    assert qnn.resolve_kernel("auto", qt) == "xla"
    with pytest.raises(ValueError, match=reason):
      qnn.resolve_kernel("cpu", qt)


def test_quantized_matmul_uses_xla_for_many_tokens_and_gradients():
  """Through the layer's matmul with kernel "cpu": few tokens run the
  kernel, more than MAX_TOKENS and any gradient the XLA path; values and
  input gradients equal the "xla" kernel's within the tolerance."""
  qt = _weight("nf4", 64, True, n=24, k=128, seed=7)

  def lowered(x):
    f = jax.jit(lambda x: qnn.frozen_matmul(x, qt, jnp.float32, "cpu"))
    return f.lower(x).as_text()

  few = jnp.ones((cpu_matmul.MAX_TOKENS, 128))
  many = jnp.ones((cpu_matmul.MAX_TOKENS + 1, 128))
  assert "qlora_matmul4" in lowered(few)
  assert "qlora_matmul4" not in lowered(many)

  x = jax.random.normal(jax.random.key(8), (5, 128), jnp.float32)
  y_cpu = qnn.frozen_matmul(x, qt, jnp.float32, "cpu")
  y_xla = qnn.frozen_matmul(x, qt, jnp.float32, "xla")
  assert _rel_err(y_cpu, y_xla) < 1e-5

  def loss(x, kernel):
    return jnp.sum(jnp.sin(qnn.frozen_matmul(x, qt, jnp.float32, kernel)))

  v_cpu, g_cpu = jax.value_and_grad(loss)(x, "cpu")
  v_xla, g_xla = jax.value_and_grad(loss)(x, "xla")
  np.testing.assert_allclose(v_cpu, v_xla, rtol=1e-5)
  assert _rel_err(g_cpu, g_xla) < 1e-5


def test_bfloat16_activations_come_back_in_bfloat16():
  """bf16 x is read exactly in float32; the float32 sums are rounded once
  to bf16: within one bf16 rounding (2^-8 relative) of the float64 sums."""
  qt = _weight("nf4", 32, True, n=8, k=64, seed=9)
  x = jax.random.normal(jax.random.key(10), (3, 64)).astype(jnp.bfloat16)
  y = cpu_matmul.matmul(x, qt, jnp.bfloat16)
  assert y.dtype == jnp.bfloat16
  w = np.asarray(quant.dequantize(qt, jnp.float32), np.float64)
  assert _rel_err(y, np.asarray(x, np.float64) @ w.T) < 2**-8


def test_generation_with_the_kernel_equals_the_xla_path():
  """A quantized Llama (GQA) decodes the same greedy tokens with the C++
  kernel as with the XLA path, and its prompt logits agree to float32
  tolerance (1e-4 relative over two layers)."""
  folder = pathlib.Path(__file__).parent / "data" / "hf" / "llama_gqa"
  ref = np.load(folder / "reference.npz")
  prompt = ref["prompt_ids"]
  outs, logits = {}, {}
  for kernel in ("cpu", "xla"):
    lm = models.from_pretrained(
      folder,
      quant={"data_type": "nf4", "block_size": 32, "double_quant": True},
      matmul_kernel=kernel,
    )
    outs[kernel] = np.asarray(
      models.generate(
        lm.model, lm.variables, prompt, max_new_tokens=6, eos_token_id=()
      )
    )
    logits[kernel] = lm.model.apply(lm.variables, prompt)
  np.testing.assert_array_equal(outs["cpu"], outs["xla"])
  assert _rel_err(logits["cpu"], logits["xla"]) < 1e-4


def test_a_missing_or_failing_compiler_is_a_build_error(tmp_path, monkeypatch):
  """build() (uncached) with $CXX naming no program, or a compiler that
  fails: BuildError naming it, nothing left in the kernel cache."""
  monkeypatch.setenv("QLORA_JAX_CACHE", str(tmp_path))
  monkeypatch.setenv("CXX", str(tmp_path / "no-such-c++"))
  with pytest.raises(cpu_matmul.BuildError, match="no-such-c"):
    cpu_matmul.build.__wrapped__("native")
  monkeypatch.setenv("CXX", "false")  # runs and exits 1
  with pytest.raises(cpu_matmul.BuildError, match="with false failed"):
    cpu_matmul.build.__wrapped__("generic")
  assert list((tmp_path / "kernels").iterdir()) == []


def test_without_the_kernel_auto_stays_with_xla(monkeypatch):
  """Where the kernel cannot be built, "auto" picks XLA and an explicit
  "cpu" is an error carrying the reason."""
  monkeypatch.setattr(cpu_matmul, "unavailable", lambda: "no compiler here")
  qt = _weight("nf4", 64, True)
  assert qnn.resolve_kernel("auto", qt) == "xla"
  with pytest.raises(ValueError, match="no compiler here"):
    qnn.resolve_kernel("cpu", qt)
