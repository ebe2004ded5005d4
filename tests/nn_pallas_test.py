"""The fused 4-bit Pallas matmuls, in interpret mode on the CPU, against the
XLA path (dequantize, then dot) that is their reference.

Tolerances: float32 operands, where both paths round each weight once to
float32 and accumulate in float32 in different orders: 1e-5 relative to the
largest output. bfloat16 operands: the same weight rounded once to bfloat16
in both, products accumulated in float32, outputs rounded to bfloat16, so
outputs differ by at most a few bf16 ulps: 2e-2 relative to the largest.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qlora_jax import nn as qnn
from qlora_jax import quant
from qlora_jax.nn import pallas_matmul as pm

# (m tokens, out, in, block size): aligned to the tiles and not.
SHAPES = {
  "aligned": (16, 64, 256, 64),
  "ragged": (5, 40, 96, 32),
  "big_block": (3, 48, 256, 128),
}
CASES = [
  ("gpu", "nf4", True, "ragged"),
  ("gpu", "fp4", False, "aligned"),
  ("gpu", "int4", True, "big_block"),
  ("tpu", "nf4", True, "aligned"),
  ("tpu", "fp4", True, "ragged"),
  ("tpu", "int4", False, "big_block"),
]


def _operands(shape, data_type, double_quant, seed=0):
  m, n, k, bs = shape
  keys = jax.random.split(jax.random.key(seed), 3)
  w = jax.random.normal(keys[0], (n, k), jnp.float32)
  qt = quant.quantize(
    w, data_type=data_type, block_size=bs, double_quant=double_quant
  )
  x = jax.random.normal(keys[1], (m, k), jnp.float32)
  g = jax.random.normal(keys[2], (m, n), jnp.float32)
  return qt, x, g


def _rel_err(a, b):
  a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
  return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.mark.parametrize("target,data_type,dq,shape", CASES)
def test_both_matmuls_match_xla_in_float32(target, data_type, dq, shape):
  qt, x, g = _operands(SHAPES[shape], data_type, dq)
  w = quant.dequantize(qt, jnp.float32)
  y = pm.matmul(x, qt, jnp.float32, target=target, interpret=True)
  dx = pm.input_grad(g, qt, jnp.float32, target=target, interpret=True)
  assert y.shape == (x.shape[0], qt.shape[0])
  assert dx.shape == x.shape
  assert _rel_err(y, x @ w.T) < 1e-5
  assert _rel_err(dx, g @ w) < 1e-5


@pytest.mark.parametrize("target", ["gpu", "tpu"])
def test_bfloat16_within_bf16_tolerance(target):
  qt, x, g = _operands(SHAPES["ragged"], "nf4", True, seed=1)
  w = quant.dequantize(qt, jnp.bfloat16)
  xb, gb = x.astype(jnp.bfloat16), g.astype(jnp.bfloat16)
  y = pm.matmul(xb, qt, jnp.bfloat16, target=target, interpret=True)
  dx = pm.input_grad(gb, qt, jnp.bfloat16, target=target, interpret=True)
  assert y.dtype == jnp.bfloat16 and dx.dtype == jnp.bfloat16
  ref_y = jnp.dot(xb, w.T, preferred_element_type=jnp.float32)
  ref_dx = jnp.dot(gb, w, preferred_element_type=jnp.float32)
  assert _rel_err(y, ref_y) < 2e-2
  assert _rel_err(dx, ref_dx) < 2e-2


def test_kernel_switch_through_frozen_matmul_and_its_vjp():
  """kernel="pallas" in the layer's matmul: same value and same input
  gradient (the custom VJP's backward runs the input-gradient kernel) as
  kernel="xla", with leading batch axes."""
  qt, x, _ = _operands(SHAPES["ragged"], "nf4", True, seed=2)
  x = x.reshape(5, 1, -1)

  def loss(x, kernel):
    y = qnn.frozen_matmul(x, qt, jnp.float32, kernel)
    return jnp.sum(jnp.sin(y))

  v_xla, g_xla = jax.value_and_grad(loss)(x, "xla")
  v_pal, g_pal = jax.value_and_grad(loss)(x, "pallas")
  np.testing.assert_allclose(v_pal, v_xla, rtol=1e-5)
  assert _rel_err(g_pal, g_xla) < 1e-5


def test_resolve_kernel():
  qt4, _, _ = _operands(SHAPES["aligned"], "nf4", True)
  qt3 = quant.quantize(jnp.ones((8, 64)), data_type="nf3", block_size=64)
  assert qnn.resolve_kernel("xla", qt4) == "xla"
  assert qnn.resolve_kernel("pallas", qt4) == "pallas"
  # The CPU backend: "auto" never picks Pallas (the C++ kernel or XLA;
  # see nn_cpu_kernel_test).
  assert jax.default_backend() == "cpu"
  assert qnn.resolve_kernel("auto", qt4) in ("cpu", "xla")
  assert qnn.resolve_kernel("auto", qt3) == "xla"
  with pytest.raises(ValueError, match="3-bit codes"):
    qnn.resolve_kernel("pallas", qt3)
  with pytest.raises(ValueError, match="'triton'"):
    qnn.resolve_kernel("triton", qt4)


def test_unsupported_layouts_and_tiles_are_named():
  w = jnp.ones((4, 96))
  qt = quant.quantize(w, data_type="nf4", block_size=64)  # blocks cross rows
  assert "cross rows" in pm.unsupported_reason(qt)
  qt6 = quant.quantize(w, data_type="nf4", block_size=6)
  assert "power of two" in pm.unsupported_reason(qt6)
  qt_ok, x, _ = _operands(SHAPES["aligned"], "nf4", False)
  with pytest.raises(ValueError, match="block_k=48"):
    pm.matmul(x, qt_ok, jnp.float32, tiles=pm.Tiles(16, 16, 48))
  with pytest.raises(ValueError, match="target 'cuda'"):
    pm.matmul(x, qt_ok, jnp.float32, target="cuda")


def test_bytes_and_flops_formulas():
  qt, _, _ = _operands(SHAPES["aligned"], "nf4", True)
  m, n, k = 16, 64, 256
  # codes k*n/2 bytes + uint8 absmax per block + f32 absmax2 per 256 blocks
  # + the f32 offset; x and y in bf16.
  assert qt.nbytes == n * k // 2 + n * k // 64 + 4 * 1 + 4
  assert pm.bytes_moved(qt, m, jnp.bfloat16) == qt.nbytes + 2 * (m * k + m * n)
  assert pm.flops(m, n, k) == 2 * m * n * k


def test_bench_kernel_smoke_run_reports_json(tmp_path):
  """The benchmark script end to end at tiny shapes (interpret mode): one
  row per weight x regime x op x implementation, speedups against bf16
  computed from the rows, a JSON last line."""
  import json
  import subprocess
  import sys

  cmd = [
    sys.executable,
    "-m",
    "experiments.bench_kernel",
    "--weights=64x128",
    "--decode_tokens=4",
    "--prefill_tokens=32",
    "--pallas",
    "--repeats=1",
  ]
  out = subprocess.run(cmd, capture_output=True, text=True, check=True)
  summary = json.loads(out.stdout.strip().splitlines()[-1])
  rows = summary["rows"]
  assert len(rows) == 1 * 2 * 2 * 3
  for r in rows:
    base = next(
      b
      for b in rows
      if b["impl"] == "bf16"
      and (b["regime"], b["op"]) == (r["regime"], r["op"])
    )
    assert r["speedup_vs_bf16"] == pytest.approx(base["ms"] / r["ms"])
  decode = [
    r["speedup_vs_bf16"]
    for r in rows
    if r["impl"] == "pallas" and r["regime"] == "decode"
  ]
  assert summary["pallas_decode_speedup_vs_bf16_min"] == min(decode)


@pytest.mark.parametrize("tokens", [16, 256])
def test_triton_kernels_lower_for_cuda(tokens):
  """Without a GPU, both kernels still lower through Pallas' Triton path
  to a CUDA module (decode-like and prefill-like tiles): what interpret
  mode cannot show, that every op in them has a Triton lowering."""
  w = jax.random.normal(jax.random.key(0), (256, 512))
  qt = quant.quantize(w, "nf4", 64, True)
  x = jnp.ones((tokens, 512), jnp.bfloat16)
  g = jnp.ones((tokens, 256), jnp.bfloat16)
  for fn, arg in ((pm.matmul, x), (pm.input_grad, g)):
    f = jax.jit(
      lambda a, fn=fn: fn(a, qt, jnp.bfloat16, target="gpu", interpret=False)
    )
    text = f.trace(arg).lower(lowering_platforms=("cuda",)).as_text()
    assert "qlora_4bit" in text and "__gpu$xla.gpu.triton" in text
