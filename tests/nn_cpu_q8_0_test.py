"""The Q8_0 kernel of the CPU library (`nn.matmul_q8_0`), built for each of
its instruction-set paths, against a float64 product of the same weights.

Tolerance: the kernel multiplies by the exact float32 weights d * q and
sums k products in float32, so each output lies within k * 2^-24 *
sum_j |w_j x_j| of the float64 sum (the bound of recursive summation,
with room for a multiply-add's rounding)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qlora_jax import quant
from qlora_jax.nn import cpu_matmul

pytestmark = pytest.mark.skipif(
  cpu_matmul.unavailable() is not None,
  reason=f"the C++ kernel does not build here: {cpu_matmul.unavailable()}",
)


@pytest.fixture(scope="module", params=["native", "avx2", "generic"])
def isa(request):
  try:
    cpu_matmul.build(request.param)
  except cpu_matmul.BuildError as e:  # an old compiler without -march=x86-64-v3
    pytest.skip(f"isa {request.param}: {e}")
  return request.param


def _weight(n, k, seed):
  """A Q8_0 weight [n, k] with a zero block, and a last row whose scales
  are float16 subnormals (its outputs are checked on their own scale)."""
  rng = np.random.default_rng(seed)
  w = rng.standard_normal((n, k)).astype(np.float32)
  w[0, :32] = 0.0
  w[-1] *= 1e-7  # d ~ 3e-9
  q = quant.quantize_q8_0(jnp.asarray(w))
  assert (np.asarray(q.scales)[-1] < np.finfo(np.float16).tiny).all()
  return q


def _check(y, x, q):
  w = np.asarray(quant.dequantize_q8_0(q), np.float64)
  x = np.asarray(x, np.float64)
  want = x @ w.T
  bound = x.shape[-1] * 2.0**-24 * (np.abs(x) @ np.abs(w).T)
  assert np.asarray(y).dtype == np.float32
  assert (np.abs(np.asarray(y, np.float64) - want) <= bound).all()


# (rows of W, columns, rows of x): rows not a multiple of 8, one and
# several blocks, batch 1, 5 and 9 (a full tile of 8 and one more).
@pytest.mark.parametrize(
  "n, k, m", [(13, 96, 1), (13, 96, 5), (37, 320, 9), (3, 32, 1)]
)
def test_kernel_equals_float64_of_d_times_q(isa, n, k, m):
  q = _weight(n, k, seed=n + k)
  x = jax.random.normal(jax.random.key(m), (m, k), jnp.float32)
  _check(cpu_matmul.matmul_q8_0(x, q, isa), x, q)


def test_leading_axes_and_bfloat16_inputs():
  q = _weight(19, 64, seed=3)
  x = jax.random.normal(jax.random.key(0), (2, 3, 64), jnp.bfloat16)
  y = jax.jit(cpu_matmul.matmul_q8_0)(x, q)
  assert y.shape == (2, 3, 19)
  _check(y.reshape(6, 19), x.astype(jnp.float32).reshape(6, 64), q)


def test_rows_shared_over_threads_change_no_bit():
  # 4099 x 576 at batch 3 runs over XLA's threads; slices of 200 rows run
  # on the calling thread alone: each row's sum is computed the same way.
  q = _weight(4099, 576, seed=5)
  x = jax.random.normal(jax.random.key(1), (3, 576), jnp.float32)
  whole = np.asarray(cpu_matmul.matmul_q8_0(x, q))
  parts = [
    np.asarray(
      cpu_matmul.matmul_q8_0(
        x, quant.Q8_0Tensor(q.codes[i : i + 200], q.scales[i : i + 200])
      )
    )
    for i in range(0, 4099, 200)
  ]
  np.testing.assert_array_equal(whole, np.concatenate(parts, axis=1))


def test_a_mismatched_input_is_refused():
  q = _weight(4, 64, seed=0)
  with pytest.raises(ValueError, match="against a Q8_0 weight"):
    cpu_matmul.matmul_q8_0(jnp.zeros((1, 32)), q)
