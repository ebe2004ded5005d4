"""QLoRADense: a linear layer with a frozen (optionally quantized) base and an
optional LoRA / DoRA adapter.

Variables:
  "base" collection (frozen): `weight` [out, in] (a QuantizedTensor or a
    float array) and optional `bias` [out].
  "params" collection (trainable): `lora_a` [in, r] ([in / L, r] for
    QA-LoRA over blocks of L), `lora_b` [r, out], and for DoRA
    `lora_magnitude` [out].

The layer finds its spec in `plan` by its module path. With no spec it is a
plain frozen float linear layer (the full fine-tuning baseline trains it by
moving "base" leaves into the trainable tree).
"""

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from qlora_jax.nn.hash_dropout import Dropout
from qlora_jax.nn.lora import init_adapter
from qlora_jax.nn.matmul import dequantized, frozen_matmul
from qlora_jax.nn.plan import Plan

BASE = "base"  # frozen pretrained weights
PARAMS = "params"  # trainable: adapters and newly initialised heads

default_weight_init = nn.initializers.normal(0.02)


def path_name(module: nn.Module) -> str:
  return "/".join(module.path)


def base_param(
  module: nn.Module, name: str, init: Callable, shape, dtype=jnp.float32
) -> jnp.ndarray:
  """A frozen pretrained variable other than a linear weight (embeddings,
  norms): stored in the "base" collection, initialised from the "params"
  RNG when the model is initialised randomly."""
  return module.variable(
    BASE, name, lambda: init(module.make_rng("params"), shape, dtype)
  ).value


class QLoRADense(nn.Module):
  """y = x @ W.T (+ b) + scale * dropout(x) @ lora_a @ lora_b.

  Attributes:
    features: output features.
    use_bias: whether the base has a (frozen) bias.
    plan: per-layer adapter / quantization specs, looked up by module path.
    dtype: compute dtype of the matmuls.
    base_dtype: storage dtype of a float base (and of the base before it is
      quantized).
    weight_init: initializer of the base weight, called with shape [out, in]
      (only used when the model is initialised randomly).
    matmul_kernel: "auto", "xla", "pallas" or "cpu", for a quantized base (see
      `qlora_jax.nn.matmul.resolve_kernel`).
  """

  features: int
  use_bias: bool = False
  plan: Plan = Plan()
  dtype: Any = jnp.bfloat16
  base_dtype: Any = jnp.float32
  weight_init: Callable = default_weight_init
  matmul_kernel: str = "auto"

  @nn.compact
  def __call__(self, x: jnp.ndarray, deterministic: bool = True):
    name = path_name(self)
    spec = self.plan.lookup(name)
    lora = spec.lora
    # Matmuls over 2-D activations: XLA's CPU backend runs the backward of
    # a dot with several batch-like leading axes far slower.
    lead, in_features = x.shape[:-1], x.shape[-1]
    x = x.reshape(-1, in_features)
    cache: dict[str, Any] = {}

    def initial(key: str):
      if not cache:
        rng = self.make_rng("params")
        w_key, a_key = jax.random.split(rng)
        w = self.weight_init(w_key, (self.features, in_features), jnp.float32)
        cache.update(
          init_adapter(a_key, w, lora, spec.quant, self.base_dtype, name)
        )
      return cache[key]

    weight = self.variable(BASE, "weight", lambda: initial("weight")).value
    y = frozen_matmul(x, weight, self.dtype, self.matmul_kernel)
    if lora is not None:
      # Variables rather than `self.param`: no abstract re-run of the init
      # (an SVD for PiSSA / LoftQ) at every apply.
      a = self.variable(PARAMS, "lora_a", lambda: initial("lora_a")).value
      b = self.variable(PARAMS, "lora_b", lambda: initial("lora_b")).value
      h = Dropout(lora.dropout)(x, deterministic=deterministic)
      if lora.qa:  # the mean of each block of L inputs
        h = h.reshape(h.shape[0], a.shape[0], -1).mean(-1)
      h = h.astype(self.dtype) @ a.astype(self.dtype)
      delta = (h @ b.astype(self.dtype)) * jnp.asarray(lora.scale, self.dtype)
      if lora.dora:
        magnitude = self.variable(
          PARAMS, "lora_magnitude", lambda: initial("lora_magnitude")
        ).value
        factor = magnitude / dora_norm(weight, a, b, lora.scale)
        y = (y + delta) * factor.astype(self.dtype)
      else:
        y = y + delta
    if self.use_bias:
      bias = self.variable(
        BASE,
        "bias",
        lambda: jnp.zeros((self.features,), self.base_dtype),
      ).value
      y = y + bias.astype(self.dtype)
    return y.reshape(*lead, self.features)


def dora_norm(weight, a, b, scale: float) -> jnp.ndarray:
  """Row norms ||W + scale * (a @ b).T|| per output, detached (DoRA)."""
  merged = dequantized(weight, jnp.float32) + scale * (a @ b).T
  return jax.lax.stop_gradient(jnp.linalg.norm(merged, axis=1))
