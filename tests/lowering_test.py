"""The whole train step lowers for GPU and TPU on a CPU-only machine."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import minilm_docstrings
from qlora_jax import models
from qlora_jax import nn as qnn
from qlora_jax.engine import lowering, steps
from qlora_jax.engine.settings import Settings

HF = {
  "model_type": "llama",
  "vocab_size": 512,
  "hidden_size": 128,
  "intermediate_size": 256,
  "num_hidden_layers": 2,
  "num_attention_heads": 4,
  "num_key_value_heads": 2,
}
LINEAR = 7  # q, k, v, o, gate, up, down: one scanned layer body


def _settings(kernel="auto", **model):
  c = minilm_docstrings.get_config()
  c.model.checkpoint = ""
  c.model.task = "causal_lm"
  c.model.hf_config = HF
  c.model.scan_layers = True
  c.model.remat = True
  c.model.dtype = "bfloat16"
  c.model.matmul_kernel = kernel
  for k, v in model.items():
    c.model[k] = v
  c.data.source = "synthetic"
  c.data.max_length = 64
  c.train.batch_size = 2
  c.lora.rank = 4
  return Settings.from_config(c)


@pytest.mark.parametrize(
  "platform,call", [("tpu", "tpu_custom_call"), ("cuda", lowering.TRITON_CALL)]
)
def test_fused_kernels_lower_for_the_device(platform, call):
  s = _settings()
  low = lowering.export_train_step(s, models.from_dict(HF), platform)
  assert low.exported.platforms == (platform,)
  # At least the forward and the input gradient of each quantized linear
  # layer of the scanned body run the kernel (the remat recomputation adds
  # more sites; identical calls may share one).
  assert low.custom_calls.get(call, 0) >= 2 * LINEAR, low.custom_calls
  assert set(low.custom_calls) == {call}  # nothing else custom
  step = lowering.abstract_step(s, models.from_dict(HF))
  want = [a.shape for a in jax.tree.leaves(step.args)]
  assert [a.shape for a in low.exported.in_avals] == want


def test_xla_kernel_lowers_without_custom_kernels():
  s = _settings(kernel="xla")
  for platform in ("tpu", "cuda"):
    low = lowering.export_train_step(s, models.from_dict(HF), platform)
    assert "tpu_custom_call" not in low.custom_calls
    assert lowering.TRITON_CALL not in low.custom_calls


def test_exported_step_is_the_engine_step():
  """Exported for the CPU and called: the same loss and new parameters as
  the step `engine.train` builds (`steps.jit_train_step` over the model
  `init_random` makes, on a one-device mesh) on the same inputs."""
  s = _settings(kernel="xla", dtype="float32")
  config = models.from_dict(HF)
  step = lowering.abstract_step(s, config)
  exported = jax.export.export(step.fn, platforms=["cpu"])(*step.args)
  lm = models.init_random(
    HF,
    lora=s.lora_plan(),
    quant=s.quant_plan(),
    scan_layers=True,
    remat=True,
  )
  trainable, frozen = qnn.split_trainable(lm.variables, [])
  rng = np.random.default_rng(0)
  batch = steps.random_lm_batch(rng, 512, 2, 64)
  from qlora_jax.engine import optim, sharding  # noqa: PLC0415

  tx, _ = optim.make_optimizer(s.opt, 1000)
  state = steps.create_state(trainable, tx, s.train.seed)
  copy = jax.tree.map(jnp.copy, state)
  got_state, got = exported.call(state, batch, frozen)
  mesh = sharding.make_mesh(1, 1)
  engine_fn = steps.jit_train_step(
    lm.model,
    "causal_lm",
    tx,
    1,
    sharding.tree_shardings(mesh, copy),
    sharding.batch_sharding(mesh),
    sharding.tree_shardings(mesh, frozen),
  )
  want_state, want = engine_fn(copy, batch, frozen)
  assert float(got["loss"]) == float(want["loss"])
  for a, b in zip(
    jax.tree.leaves(got_state.params),
    jax.tree.leaves(want_state.params),
    strict=True,
  ):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_unknown_platform():
  with pytest.raises(ValueError, match="platform 'metal'"):
    lowering.export_train_step(_settings(), models.from_dict(HF), "metal")
