"""Optimizer: schedules, clipping and LoRA+ against their formulas."""

import dataclasses

import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import minilm_docstrings as default
from qlora_jax.engine import optim
from qlora_jax.engine.settings import Settings

OPT = Settings.from_config(default.get_config()).opt


def _opt(**fields):
  return dataclasses.replace(OPT, **fields)


def test_schedules_warm_up_then_decay():
  for name, mid in (("constant", 1.0), ("linear", 0.5), ("cosine", 0.5)):
    lr = optim.schedule(name, 1.0, total_steps=110, warmup_steps=10)
    assert float(lr(0)) == 0.0
    assert float(lr(5)) == pytest.approx(0.5)
    assert float(lr(10)) == pytest.approx(1.0)
    # Halfway through the decay: 1 (constant), 0.5 (linear and cosine).
    assert float(lr(60)) == pytest.approx(mid, abs=1e-6)
    if name != "constant":
      assert float(lr(110)) == pytest.approx(0.0, abs=1e-6)


def test_warmup_ratio_and_steps():
  assert optim.warmup_steps(_opt(warmup_ratio=0.03, warmup_steps=0), 1000) == 30
  assert optim.warmup_steps(_opt(warmup_steps=7, warmup_ratio=0.5), 100) == 7


def _adamw_reference(cfg, params, grads_seq):
  """The updates of AdamW (bias-corrected moments, decoupled weight decay)
  in float64 NumPy, each gradient first scaled to the global norm
  `cfg.max_grad_norm` when its norm is larger (0: never), and LoRA+'s B at
  `lora_plus_ratio` times the learning rate."""
  p = {k: np.asarray(v, np.float64) for k, v in params.items()}
  m = {k: np.zeros_like(v) for k, v in p.items()}
  v = {k: np.zeros_like(x) for k, x in p.items()}
  out = []
  for t, g in enumerate(grads_seq, start=1):
    g = {k: np.asarray(x, np.float64) for k, x in g.items()}
    norm = np.sqrt(sum(np.sum(x**2) for x in g.values()))
    if cfg.max_grad_norm and norm > cfg.max_grad_norm:
      g = {k: x * cfg.max_grad_norm / norm for k, x in g.items()}
    step = {}
    for k in p:
      m[k] = cfg.b1 * m[k] + (1 - cfg.b1) * g[k]
      v[k] = cfg.b2 * v[k] + (1 - cfg.b2) * g[k] ** 2
      m_hat, v_hat = m[k] / (1 - cfg.b1**t), v[k] / (1 - cfg.b2**t)
      rate = cfg.learning_rate * (cfg.lora_plus_ratio if k == "lora_b" else 1)
      adam = m_hat / (np.sqrt(v_hat) + cfg.eps)
      step[k] = -rate * (adam + cfg.weight_decay * p[k])
      p[k] = p[k] + step[k]
    out.append(step)
  return out


@pytest.mark.parametrize(
  "max_grad_norm, ratio", [(0.3, 1.0), (0.3, 4.0), (0.0, 1.0)]
)
def test_make_optimizer_clips_then_steps_adamw(max_grad_norm, ratio):
  """Two steps of `make_optimizer`'s transformation against AdamW written
  out in float64 NumPy (`_adamw_reference`): 1e-5 relative, 1e-7 absolute
  (float32 arithmetic). The first gradient (global norm ~8.4 over both
  matrices) is clipped to 0.3, the second (norm ~0.06) is not; eps = 0.05
  is of the size of the clipped entries, so the clip changes even the
  first update (checked below to be by more than 10%), and B moves at
  `ratio` times A's learning rate."""
  cfg = _opt(
    learning_rate=0.1,
    schedule="constant",
    warmup_ratio=0.0,
    warmup_steps=0,
    weight_decay=0.1,
    b1=0.9,
    b2=0.99,
    eps=0.05,
    max_grad_norm=max_grad_norm,
    lora_plus_ratio=ratio,
  )
  params = {
    "lora_a": np.linspace(-1.0, 1.0, 8, dtype=np.float32).reshape(4, 2),
    "lora_b": np.linspace(0.5, 1.5, 6, dtype=np.float32).reshape(2, 3),
  }
  grads_seq = [
    {
      "lora_a": np.linspace(-4.0, 3.0, 8, dtype=np.float32).reshape(4, 2),
      "lora_b": np.linspace(1.0, 3.0, 6, dtype=np.float32).reshape(2, 3),
    },
    {
      "lora_a": np.linspace(0.03, -0.02, 8, dtype=np.float32).reshape(4, 2),
      "lora_b": np.linspace(-0.01, 0.02, 6, dtype=np.float32).reshape(2, 3),
    },
  ]
  norms = [optax.global_norm(g) for g in grads_seq]
  assert float(norms[0]) > 0.3 > float(norms[1])
  tx, _ = optim.make_optimizer(cfg, total_steps=10)
  tree = {"layer": {k: jnp.asarray(v) for k, v in params.items()}}
  state = tx.init(tree)
  want = _adamw_reference(cfg, params, grads_seq)
  for g, w in zip(grads_seq, want, strict=True):
    g = {"layer": {k: jnp.asarray(v) for k, v in g.items()}}
    updates, state = tx.update(g, state, tree)
    tree = optax.apply_updates(tree, updates)
    for k in params:
      np.testing.assert_allclose(
        updates["layer"][k], w[k], rtol=1e-5, atol=1e-7, err_msg=k
      )
  # The reference is sensitive to the clip: without it the first update
  # differs by more than 10% (with it, by less than 1e-5 above).
  unclipped = _adamw_reference(
    dataclasses.replace(cfg, max_grad_norm=0.0), params, grads_seq
  )
  if max_grad_norm:
    assert not np.allclose(unclipped[0]["lora_a"], want[0]["lora_a"], rtol=0.1)


def test_bad_optimizer_settings_name_the_field():
  # OptSettings owns its rules: a bad one cannot even be built.
  with pytest.raises(ValueError, match="^schedule: unknown value 'step'"):
    _opt(schedule="step")
  with pytest.raises(ValueError, match="^learning_rate: must be > 0"):
    _opt(learning_rate=0.0)
  with pytest.raises(ValueError, match="^lora_plus_ratio: must be > 0"):
    _opt(lora_plus_ratio=-1.0)
