"""Building blocks shared by the models: options, frozen embeddings and
norms, the linear-layer factory and the stack of identical blocks.

Frozen pretrained variables live in the "base" collection: embeddings as
`embedding`, norms as `scale` (and `bias`), linear layers as QLoRADense's
`weight` / `bias`. Only linear layers own a leaf called `weight`.
"""

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from qlora_jax import nn as qnn


@dataclasses.dataclass(frozen=True)
class Options:
  """How a model is built, independent of its architecture.

  Attributes:
    plan: adapters and quantization per linear layer (by module path).
    dtype: compute dtype.
    base_dtype: storage dtype of frozen float weights.
    embed_dtype: storage dtype of the frozen embedding tables (None:
      `base_dtype`). An embedding is only gathered from, so holding it in
      the checkpoint's own dtype (bfloat16 for most checkpoints) changes
      no result and halves its bytes; a tied head upcasts the table for
      its matmul.
    remat: recompute each block in the backward pass (gradient
      checkpointing).
    scan_layers: apply the blocks with `nn.scan` over stacked variables
      (a leading layer axis) so a deep model compiles one block.
    matmul_kernel: "auto", "xla", "pallas" or "cpu": the matmul of quantized
      linear layers (see `qlora_jax.nn.matmul.resolve_kernel`).
  """

  plan: qnn.Plan = qnn.Plan()
  dtype: Any = jnp.float32
  base_dtype: Any = jnp.float32
  remat: bool = False
  scan_layers: bool = False
  matmul_kernel: str = "auto"
  embed_dtype: Any = None

  @property
  def embedding_dtype(self):
    """The dtype embedding tables are stored in."""
    return self.base_dtype if self.embed_dtype is None else self.embed_dtype


def dense(opts: Options, features: int, use_bias: bool, name: str):
  """A QLoRADense with the model's plan and dtypes."""
  return qnn.QLoRADense(
    features,
    use_bias=use_bias,
    plan=opts.plan,
    dtype=opts.dtype,
    base_dtype=opts.base_dtype,
    matmul_kernel=opts.matmul_kernel,
    name=name,
  )


class Embed(nn.Module):
  """A frozen embedding table [num, features]."""

  num: int
  features: int
  opts: Options

  def setup(self):
    self.embedding = qnn.base_param(
      self,
      "embedding",
      nn.initializers.normal(0.02),
      (self.num, self.features),
      self.opts.embedding_dtype,
    )

  def __call__(self, ids: jnp.ndarray) -> jnp.ndarray:
    return jnp.take(self.embedding, ids, axis=0).astype(self.opts.dtype)


class RMSNorm(nn.Module):
  """x / rms(x) * (offset + scale), computed in float32 (transformers'
  LlamaRMSNorm; Gemma's, whose stored weight w scales by 1 + w, with
  `offset` 1)."""

  eps: float
  opts: Options
  offset: float = 0.0

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    init = nn.initializers.zeros if self.offset else nn.initializers.ones
    scale = qnn.base_param(
      self, "scale", init, (x.shape[-1],), self.opts.base_dtype
    )
    xf = x.astype(jnp.float32)
    xf = xf * jax.lax.rsqrt(
      jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps
    )
    weight = scale.astype(jnp.float32)
    if self.offset:
      weight = self.offset + weight
    return (weight * xf).astype(self.opts.dtype)


class LayerNorm(nn.Module):
  """LayerNorm with frozen `scale` and `bias`, computed in float32."""

  eps: float
  opts: Options

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    features = (x.shape[-1],)
    dtype = self.opts.base_dtype
    scale = qnn.base_param(self, "scale", nn.initializers.ones, features, dtype)
    bias = qnn.base_param(self, "bias", nn.initializers.zeros, features, dtype)
    xf = x.astype(jnp.float32)
    mean = jnp.mean(xf, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(xf - mean), axis=-1, keepdims=True)
    y = (xf - mean) * jax.lax.rsqrt(var + self.eps)
    y = y * scale.astype(jnp.float32) + bias.astype(jnp.float32)
    return y.astype(self.opts.dtype)


def stack_blocks(
  block: type[nn.Module],
  attrs: dict,
  num_layers: int,
  opts: Options,
  name: str,
  x: jnp.ndarray,
  shared: tuple,
  kv=None,
  per_layer: tuple = (),
):
  """Applies `num_layers` identical blocks; call inside a compact method.

  Each block is `block(**attrs)` called as `block(x, *shared, *mine,
  kv_layer)`, where `mine` is layer i's slice of each `per_layer` array
  (a leading layer axis: what differs between layers, e.g. whether a
  layer attends within a sliding window), and returns `(x, kv_layer_out)`.
  Unscanned, blocks are named `{name}_{i}`; with `opts.scan_layers` a
  single `nn.scan` module `{name}` holds stacked variables (leading axis =
  layer). `kv` is None or a pytree
  of arrays with a leading layer axis (the KV cache); the result's has one
  too.

  Returns:
    (x, kv) after the last block.
  """
  cls = block
  if opts.remat:
    cls = nn.remat(block, prevent_cse=not opts.scan_layers)
  if opts.scan_layers:
    scanned = nn.scan(
      cls,
      variable_axes={qnn.BASE: 0, qnn.PARAMS: 0},
      split_rngs={"params": True, "dropout": True},
      in_axes=(nn.broadcast,) * len(shared) + (0,) * (len(per_layer) + 1),
      length=num_layers,
    )
    return scanned(**attrs, name=name)(x, *shared, *per_layer, kv)
  outs = []
  for i in range(num_layers):
    layer_kv = None if kv is None else jax.tree.map(lambda a, i=i: a[i], kv)
    mine = tuple(a[i] for a in per_layer)
    x, out = cls(**attrs, name=f"{name}_{i}")(x, *shared, *mine, layer_kv)
    outs.append(out)
  if kv is None:
    return x, None
  return x, jax.tree.map(lambda *a: jnp.stack(a), *outs)
