"""QLoRADense: identities, formulas and gradients of the QLoRA layer."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from qlora_jax import nn as qnn
from qlora_jax import quant

IN, HID, OUT = 128, 192, 64
NF4_DQ = {"data_type": "nf4", "block_size": 64, "double_quant": True}


class Stack(nn.Module):
  """Two QLoRA layers named "up" and "down"."""

  plan: qnn.Plan = qnn.Plan()
  dtype: jnp.dtype = jnp.float32
  remat: bool = False

  @nn.compact
  def __call__(self, x, deterministic=True):
    dense = qnn.QLoRADense
    if self.remat:
      dense = nn.remat(qnn.QLoRADense, static_argnums=(2,))
    h = dense(HID, plan=self.plan, dtype=self.dtype, name="up")(
      x, deterministic
    )
    h = jax.nn.gelu(h)
    return dense(
      OUT, use_bias=True, plan=self.plan, dtype=self.dtype, name="down"
    )(h, deterministic)


class Single(nn.Module):
  """One QLoRA layer at path "up" (the Stack's first layer)."""

  plan: qnn.Plan = qnn.Plan()

  @nn.compact
  def __call__(self, x):
    return qnn.QLoRADense(HID, plan=self.plan, dtype=jnp.float32, name="up")(x)


def _x(n=6, seed=1):
  return jax.random.normal(jax.random.key(seed), (n, IN), jnp.float32)


def _plan(lora=None, quant_cfg=None):
  return qnn.make_plan(["down", "up"], lora, quant_cfg)


def _init(plan, **kw):
  model = Stack(plan, **kw)
  return model, model.init(jax.random.key(0), _x())


def _randomize_b(variables, seed=3):
  """B != 0 so that adapters change the output."""
  flat = qnn.flatten(variables)
  key = jax.random.key(seed)
  for path, leaf in flat.items():
    if path[-1] == "lora_b":
      key, sub = jax.random.split(key)
      flat[path] = 0.05 * jax.random.normal(sub, leaf.shape)
  return qnn.unflatten(flat)


def _layer_vars(variables, name="up"):
  out = {"base": variables["base"][name]}
  if name in variables.get("params", {}):
    out["params"] = variables["params"][name]
  return jax.tree.map(lambda a: a, {k: {name: v} for k, v in out.items()})


def test_zero_b_at_init_gives_the_quantized_base_exactly():
  plan = _plan({"rank": 4, "alpha": 8}, NF4_DQ)
  model, variables = _init(plan)
  base_only = Stack(_plan(None, NF4_DQ))
  # Exact: B = 0 adds exact zeros to the same quantized matmul.
  np.testing.assert_array_equal(
    model.apply(variables, _x()),
    base_only.apply({"base": variables["base"]}, _x()),
  )


def test_merged_equals_unmerged():
  plan = _plan({"rank": 8, "alpha": 16}, NF4_DQ)
  model, variables = _init(plan)
  variables = _randomize_b(variables)
  merged = qnn.merge_adapters(variables, plan)
  y = model.apply(variables, _x())
  y_merged = Stack(qnn.Plan()).apply(merged, _x())
  # x W + s (x A) B vs x (W + s A B): f32 re-association, 1e-5.
  np.testing.assert_allclose(y_merged, y, rtol=1e-5, atol=1e-5)
  assert not merged.get("params")
  assert merged["base"]["up"]["weight"].dtype == jnp.float32


def test_unmerge_restores_the_float_base():
  plan = _plan({"rank": 4, "alpha": 8}, None)
  _, variables = _init(plan)
  variables = _randomize_b(variables)
  merged = qnn.merge_adapters(variables, plan)
  back = qnn.unmerge_adapters(merged, variables["params"], plan)
  for name in ("up", "down"):
    np.testing.assert_allclose(
      back["base"][name]["weight"], variables["base"][name]["weight"], atol=1e-6
    )


def test_requantized_merge_is_the_quantized_merged_weight():
  plan = _plan({"rank": 4, "alpha": 8}, NF4_DQ)
  _, variables = _init(plan)
  variables = _randomize_b(variables)
  float_merge = qnn.merge_adapters(variables, plan)
  requant = qnn.merge_adapters(variables, plan, requantize=True)
  qt = requant["base"]["up"]["weight"]
  assert isinstance(qt, quant.QuantizedTensor) and qt.double_quant
  want = quant.quantize(float_merge["base"]["up"]["weight"], "nf4", 64, True)
  np.testing.assert_array_equal(qt.codes, want.codes)


def test_gradients_only_on_the_trainable_tree_and_all_nonzero():
  plan = _plan({"rank": 4, "alpha": 8}, NF4_DQ)
  model, variables = _init(plan)
  variables = _randomize_b(variables)
  trainable, frozen = qnn.split_trainable(variables)
  leaves = qnn.flatten(trainable)
  assert {p[0] for p in leaves} == {"params"}
  assert {p[-1] for p in leaves} == {"lora_a", "lora_b"}

  def loss(t):
    return jnp.sum(model.apply(qnn.merge_trees(t, frozen), _x()) ** 2)

  grads = qnn.flatten(jax.grad(loss)(trainable))
  assert grads.keys() == leaves.keys()
  for path, g in grads.items():
    assert float(jnp.abs(g).max()) > 0, path


def test_frozen_bytes_unchanged_after_optimizer_steps():
  """Three AdamW steps (weight decay 0.1, so that every leaf the optimizer
  holds moves) over the split of two QLoRA layers. The reference is the
  names: every leaf but `lora_a` and `lora_b` (packed codes and scales,
  the bias, wherever the layer declares them) keeps, exactly, the bytes of
  a NumPy copy taken at init, in the layers' variables after training
  (the trained tree merged with the frozen one); the trainable tree and
  Adam's moments hold the adapters and nothing else, and every adapter
  moved. A layer that declared a frozen variable trainable fails."""
  plan = _plan({"rank": 4, "alpha": 8}, NF4_DQ)
  model, variables = _init(plan)
  before = {
    path: [np.array(a) for a in jax.tree.leaves(leaf)]
    for path, leaf in qnn.flatten(variables).items()
  }
  adapters = {p for p in before if p[-1] in ("lora_a", "lora_b")}
  assert len(adapters) == 4 and any(p[-1] == "bias" for p in before)
  trainable, frozen = qnn.split_trainable(variables)
  assert set(qnn.flatten(trainable)) == adapters
  opt = optax.adamw(1e-2, weight_decay=0.1)
  state = opt.init(trainable)
  mu = optax.tree_utils.tree_get(state, "mu")
  assert set(qnn.flatten(mu)) == adapters

  @jax.jit
  def step(t, s):
    def loss(t):
      y = model.apply(qnn.merge_trees(t, frozen), _x())
      return jnp.mean((y - 1.0) ** 2)

    u, s = opt.update(jax.grad(loss)(t), s, t)
    return optax.apply_updates(t, u), s

  for _ in range(3):
    trainable, state = step(trainable, state)
  assert set(qnn.flatten(trainable)) == adapters
  after = qnn.flatten(qnn.merge_trees(trainable, frozen))
  assert after.keys() == before.keys()
  for path, old in before.items():
    new = [np.array(a) for a in jax.tree.leaves(after[path])]
    if path in adapters:
      assert not np.array_equal(new[0], old[0]), path
      continue
    assert len(new) == len(old), path
    for a, b in zip(old, new, strict=True):
      assert a.dtype == b.dtype and a.tobytes() == b.tobytes(), path


def test_scale_and_rslora_formula():
  x = _x()
  for rslora, scale in ((False, 8 / 4), (True, 8 / 2)):
    plan = _plan({"rank": 4, "alpha": 8, "rslora": rslora}, None)
    _, variables = _init(plan)
    v = _layer_vars(_randomize_b(variables))
    w, p = v["base"]["up"]["weight"], v["params"]["up"]
    want = x @ w.T + scale * (x @ p["lora_a"] @ p["lora_b"])
    y = Single(plan).apply(v, x)
    np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5)


def test_dora_matches_its_formula():
  plan = _plan({"rank": 4, "alpha": 8, "dora": True}, NF4_DQ)
  _, variables = _init(plan)
  v = _layer_vars(_randomize_b(variables))
  p = dict(v["params"]["up"])
  p["lora_magnitude"] = p["lora_magnitude"] * 1.3  # m != ||W|| so it matters
  v["params"]["up"] = p
  w = quant.dequantize(v["base"]["up"]["weight"], jnp.float32)
  scale = 2.0
  merged = w + scale * (p["lora_a"] @ p["lora_b"]).T
  norm = jnp.linalg.norm(merged, axis=1)
  # DoRA: m * (W + sBA) / ||W + sBA|| per output row.
  want = _x() @ (merged * (p["lora_magnitude"] / norm)[:, None]).T
  y = Single(plan).apply(v, _x())
  np.testing.assert_allclose(y, want, rtol=1e-4, atol=1e-5)

  # The magnitude at init is the row norm of the (quantized) base: output
  # equals the base exactly up to f32 rounding.
  _, fresh = _init(plan)
  fv = _layer_vars(fresh)
  y0 = Single(plan).apply(fv, _x())
  wq = quant.dequantize(fv["base"]["up"]["weight"], jnp.float32)
  np.testing.assert_allclose(y0, _x() @ wq.T, rtol=1e-5, atol=1e-5)

  # The norm is detached: d/dA flows only through the adapter path.
  def out(a, detach):
    merged = w + scale * (a @ p["lora_b"]).T
    n = jnp.linalg.norm(merged, axis=1)
    n = jax.lax.stop_gradient(n) if detach else n
    delta = scale * (_x() @ a @ p["lora_b"])
    return jnp.sum(((_x() @ w.T + delta) * (p["lora_magnitude"] / n)) ** 2)

  def ours(a):
    pv = dict(p, lora_a=a)
    vv = {"base": v["base"], "params": {"up": pv}}
    return jnp.sum(Single(plan).apply(vv, _x()) ** 2)

  g_ours = jax.grad(ours)(p["lora_a"])
  np.testing.assert_allclose(
    g_ours, jax.grad(out)(p["lora_a"], True), rtol=1e-3, atol=1e-5
  )
  assert not np.allclose(
    jax.grad(out)(p["lora_a"], True), jax.grad(out)(p["lora_a"], False)
  )


def test_custom_vjp_matches_naive_dequantize_then_matmul():
  w = jax.random.normal(jax.random.key(5), (HID, IN)) * 0.1
  for spec in [("nf4", 64, True), ("fp4", 128, False), ("int3", 64, True)]:
    qt = quant.quantize(w, *spec)
    x = _x()

    def ours(x, qt=qt):
      return jnp.sum(jnp.sin(qnn.frozen_matmul(x, qt, jnp.float32)))

    def naive(x, qt=qt):
      return jnp.sum(jnp.sin(x @ quant.dequantize(qt, jnp.float32).T))

    np.testing.assert_allclose(ours(x), naive(x), rtol=1e-6)
    # Same dequantized weight, same matmuls: equal to f32 rounding.
    np.testing.assert_allclose(
      jax.grad(ours)(x), jax.grad(naive)(x), rtol=1e-5, atol=1e-6
    )


def test_custom_vjp_keeps_no_float_weight_as_residual():
  w = jax.random.normal(jax.random.key(5), (HID, IN))
  qt = quant.quantize(w, "nf4", 64, True)
  x = _x()
  _, vjp = jax.vjp(lambda x: qnn.frozen_matmul(x, qt, jnp.float32), x)
  residual_sizes = [a.size for a in jax.tree.leaves(vjp)]
  # Residuals: the packed weight (uint8 codes, scales) only, nothing of the
  # float weight's size (HID * IN elements).
  assert max(residual_sizes) < HID * IN
  float_res = [
    a
    for a in jax.tree.leaves(vjp)
    if jnp.issubdtype(a.dtype, jnp.floating) and a.size >= HID * IN
  ]
  assert not float_res


def test_remat_composes_with_the_custom_vjp():
  plan = _plan({"rank": 4, "alpha": 8}, NF4_DQ)
  model, variables = _init(plan)
  variables = _randomize_b(variables)
  remat_model = Stack(plan, remat=True)
  trainable, frozen = qnn.split_trainable(variables)

  def loss(m):
    return lambda t: jnp.sum(m.apply(qnn.merge_trees(t, frozen), _x()) ** 2)

  g = jax.grad(loss(model))(trainable)
  g_remat = jax.grad(loss(remat_model))(trainable)
  for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g_remat), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_jit_and_eager_agree():
  plan = _plan({"rank": 4, "alpha": 8}, NF4_DQ)
  model, variables = _init(plan)
  variables = _randomize_b(variables)
  with jax.disable_jit():
    eager = model.apply(variables, _x())
  jitted = jax.jit(model.apply)(variables, _x())
  np.testing.assert_allclose(jitted, eager, rtol=1e-6, atol=1e-6)


def test_dropout_only_on_the_adapter_input_and_keyed():
  plan = _plan({"rank": 4, "alpha": 8, "dropout": 0.5}, None)
  model, variables = _init(plan)
  variables = _randomize_b(variables)
  det = model.apply(variables, _x())
  r1 = model.apply(variables, _x(), False, rngs={"dropout": jax.random.key(1)})
  r1b = model.apply(variables, _x(), False, rngs={"dropout": jax.random.key(1)})
  r2 = model.apply(variables, _x(), False, rngs={"dropout": jax.random.key(2)})
  np.testing.assert_array_equal(r1, r1b)
  assert not np.allclose(r1, r2) and not np.allclose(r1, det)
  # With B = 0, dropout cannot change anything: it acts on the adapter only.
  _, fresh = _init(plan)
  np.testing.assert_array_equal(
    model.apply(fresh, _x(), False, rngs={"dropout": jax.random.key(1)}),
    model.apply(fresh, _x()),
  )


def test_bf16_compute_stays_close_to_f32():
  plan = _plan({"rank": 4, "alpha": 8}, NF4_DQ)
  _, variables = _init(plan)
  variables = _randomize_b(variables)
  y32 = Stack(plan).apply(variables, _x())
  y16 = Stack(plan, dtype=jnp.bfloat16).apply(variables, _x())
  assert y16.dtype == jnp.bfloat16
  # bf16 has 8 bits of mantissa: ~1% relative over two layers.
  rel = jnp.linalg.norm(y16.astype(jnp.float32) - y32) / jnp.linalg.norm(y32)
  assert float(rel) < 0.02


def test_chunked_planar_matmul_equals_dequantize_then_matmul(monkeypatch):
  from qlora_jax.nn import matmul as fm

  # 16 rows per chunk: several loop iterations on small shapes.
  monkeypatch.setattr(fm, "CHUNK_ELEMENTS", 16 * IN)
  x = _x()
  cases = [
    ((HID, IN), ("nf4", 64, True), 16),
    ((HID, IN), ("fp4", 32, False), 16),
    ((HID, IN), ("int8", 64, True), 16),
    ((HID, IN), ("nf2", 64, False), 16),
    ((HID, IN), ("int3", 64, False), None),  # 3 bits: codes span bytes
    ((HID, IN), ("nf4", 96, False), None),  # blocks straddle rows
  ]
  for shape, spec, rows in cases:
    w = jax.random.normal(jax.random.key(7), shape) * 0.1
    qt = quant.quantize(w, *spec)
    assert fm.chunk_rows(qt) == rows, spec
    w_hat = quant.dequantize(qt, jnp.float32)

    def ours(x, qt=qt):
      return qnn.frozen_matmul(x, qt, jnp.float32)

    # Same dequantized values, summed in another order: 1e-5 relative.
    np.testing.assert_allclose(ours(x), x @ w_hat.T, rtol=1e-5, atol=1e-5)
    g = jax.random.normal(jax.random.key(8), (x.shape[0], shape[0]))
    _, vjp = jax.vjp(ours, x)
    np.testing.assert_allclose(vjp(g)[0], g @ w_hat, rtol=1e-5, atol=1e-5)


def test_a_bfloat16_weight_is_upcast_in_chunks(monkeypatch):
  """A bfloat16 W with float32 matmuls (`upcast_matmul`, 16 rows a chunk):
  outputs, input and weight gradients equal the plain matmul's of W in
  float32 to 1e-5 relative, and the compiled step holds no float32 array
  of W's size (XLA:CPU would otherwise convert W whole before the loop)."""
  import re  # noqa: PLC0415

  from qlora_jax.nn import matmul as fm  # noqa: PLC0415

  monkeypatch.setattr(fm, "CHUNK_ELEMENTS", 16 * IN)
  w = (jax.random.normal(jax.random.key(9), (HID, IN)) * 0.1).astype(
    jnp.bfloat16
  )
  assert fm.float_chunk_rows(w) == 16
  x = _x()
  g = jax.random.normal(jax.random.key(8), (x.shape[0], HID))

  def ours(x, w):
    return qnn.frozen_matmul(x, w, jnp.float32)

  def plain(x, w):
    return x @ w.astype(jnp.float32).T

  np.testing.assert_allclose(
    jax.jit(ours)(x, w), plain(x, w), rtol=1e-5, atol=1e-5
  )
  (dx, dw), (px, pw) = (
    jax.jit(lambda x, w, f=f: jax.vjp(f, x, w)[1](g))(x, w)
    for f in (ours, plain)
  )
  np.testing.assert_allclose(dx, px, rtol=1e-5, atol=1e-5)
  assert dw.dtype == jnp.bfloat16
  np.testing.assert_allclose(
    dw.astype(jnp.float32), pw.astype(jnp.float32), rtol=1e-2, atol=1e-3
  )

  def loss(x):
    return jnp.sum(ours(x, w) ** 2)

  text = jax.jit(jax.grad(loss)).lower(x).compile().as_text()
  whole = rf"f32\[({HID},{IN}|([2-9]|\d{{2,}}),16,{IN})\]"  # not [1,16,IN]
  assert not re.search(whole, text), re.search(whole, text)


def test_few_token_planes_read_by_selects_equal_the_gathered_ones():
  """Matmuls over at most SELECT_MAX_TOKENS tokens read a table of up to
  16 entries by a tree of selects: every code of every such data type
  gives the table's value bit for bit, and the matmul is the gathered
  path's exactly (same planes, same dots)."""
  from qlora_jax.nn import matmul as fm
  from qlora_jax.quant.blockwise import select_values
  from qlora_jax.quant.codebooks import get_data_type

  for name in ("nf4", "fp4", "int4", "nf3", "int2", "int4_asym"):
    dt = get_data_type(name)
    idx = jnp.arange(2**dt.bits, dtype=jnp.uint8)
    got = np.asarray(select_values(dt.values, idx))
    np.testing.assert_array_equal(
      got.view(np.uint32), dt.values.view(np.uint32)
    )
  w = jax.random.normal(jax.random.key(3), (HID, IN)) * 0.1
  x = jax.random.normal(jax.random.key(4), (3, IN))
  for spec in (("nf4", 64, True), ("fp4", 32, False), ("nf2", 64, False)):
    qt = quant.quantize(w, *spec)
    few = np.asarray(fm.quantized_matmul(x, qt, jnp.float32))
    assert x.shape[0] <= fm.SELECT_MAX_TOKENS
    with pytest.MonkeyPatch.context() as mp:
      mp.setattr(fm, "SELECT_MAX_TOKENS", 0)
      gathered = np.asarray(fm.quantized_matmul(x, qt, jnp.float32))
    np.testing.assert_array_equal(few, gathered)
