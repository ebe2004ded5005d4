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


def test_clipping_and_lora_plus_ratio():
  params = {"layer": {"lora_a": jnp.ones((4, 2)), "lora_b": jnp.ones((2, 3))}}
  grads = {
    "layer": {"lora_a": jnp.full((4, 2), 3.0), "lora_b": jnp.full((2, 3), 3.0)}
  }
  cfg = _opt(
    learning_rate=0.1,
    max_grad_norm=0.3,
    lora_plus_ratio=16.0,
    schedule="constant",
    warmup_ratio=0.0,
  )
  tx, _ = optim.make_optimizer(cfg, total_steps=10)
  state = tx.init(params)
  updates, _ = tx.update(grads, state, params)
  # Adam's first step moves every weight by lr (sign of the gradient); LoRA+
  # moves B by ratio * lr.
  np.testing.assert_allclose(updates["layer"]["lora_a"], -0.1, rtol=1e-4)
  np.testing.assert_allclose(updates["layer"]["lora_b"], -1.6, rtol=1e-4)
  # Clipping scales the gradient to the global norm 0.3 before Adam.
  clip = optax.clip_by_global_norm(0.3)
  clipped, _ = clip.update(grads, clip.init(params))
  assert float(optax.global_norm(clipped)) == pytest.approx(0.3, rel=1e-5)


def test_bad_optimizer_settings_name_the_field():
  # OptSettings owns its rules: a bad one cannot even be built.
  with pytest.raises(ValueError, match="^schedule: unknown value 'step'"):
    _opt(schedule="step")
  with pytest.raises(ValueError, match="^learning_rate: must be > 0"):
    _opt(learning_rate=0.0)
  with pytest.raises(ValueError, match="^lora_plus_ratio: must be > 0"):
    _opt(lora_plus_ratio=-1.0)
