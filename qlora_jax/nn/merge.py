"""Folding adapters into the base weight and back.

`merge_adapters` replaces every adapted layer's base with the float weight
`dequantize(W) + scale * (lora_a @ lora_b).T` (DoRA: rescaled per output),
the weight the adapters were trained against, and drops the adapter
variables; optionally the merged weight is quantized again with the layer's
spec. Layers stacked by `nn.scan` (a leading layer axis) are handled.

A QA-LoRA layer over an asymmetric base merges exactly with `requantize`:
its update is constant over each block of a row, so it is added to that
block's minimum, m' = m + scale / L * (A @ B).T (float32), and the codes and
scales stay as they are. The merged weight then differs from the adapted
one by the float32 rounding of m' and of d * q + m': at most
2**-24 * (|m| + |delta|) + 2**-24 * |d * q + m'| per element.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp

from qlora_jax import quant
from qlora_jax.nn.dense import BASE, PARAMS
from qlora_jax.nn.lora import full_a
from qlora_jax.nn.matmul import dequantized
from qlora_jax.nn.plan import Plan
from qlora_jax.nn.trees import flatten, unflatten


def merged_weight(weight, lora_a, lora_b, scale: float, magnitude=None):
  """float32 [out, in]: the base plus its adapter (one unstacked layer)."""
  in_features = weight.shape[-1]
  delta = scale * (full_a(lora_a, in_features) @ lora_b).T
  w = dequantized(weight, jnp.float32) + delta
  if magnitude is not None:
    w = w * (magnitude / jnp.linalg.norm(w, axis=1))[:, None]
  return w


def merged_minimum(weight: quant.QuantizedTensor, lora_a, lora_b, scale):
  """An asymmetric base with a QA-LoRA update folded into its block
  minimums (one unstacked layer): codes and scales untouched."""
  out_f, in_f = weight.shape
  size = in_f // lora_a.shape[0]  # L: the adapter sees block means
  delta = (scale / size) * (lora_a @ lora_b).T  # [out, in / L]: per block
  m = weight.minimum.astype(jnp.float32).reshape(out_f, -1) + delta
  return dataclasses.replace(weight, minimum=m.reshape(-1))


def _stack_depth(weight) -> int:
  if isinstance(weight, quant.QuantizedTensor):
    return weight.codes.ndim - 1
  return weight.ndim - 2


def _map_stacked(fn, depth: int):
  for _ in range(depth):
    fn = jax.vmap(fn)
  return fn


def merge_adapters(
  variables, plan: Plan, dtype=jnp.float32, requantize: bool = False
) -> dict:
  """Variables with every adapter folded into its base weight.

  Args:
    variables: {"base": ..., "params": ...} of a model built with `plan`.
    plan: the plan the model was built with.
    dtype: dtype of the merged float weights.
    requantize: quantize merged weights again with their layer's spec
      (QA-LoRA layers: fold the update into the block minimums, exactly).
  """
  flat = flatten(variables)
  for path in plan.lora_paths():
    spec = plan.lookup(path)
    keys = tuple(path.split("/"))
    w_key = (BASE, *keys, "weight")
    if w_key not in flat:
      raise KeyError(f"no base weight for adapted layer {path}")
    weight = flat[w_key]
    a = flat.pop((PARAMS, *keys, "lora_a"))
    b = flat.pop((PARAMS, *keys, "lora_b"))
    m = flat.pop((PARAMS, *keys, "lora_magnitude"), None)
    scale = spec.lora.scale

    def one(w, a, b, m=None, scale=scale):
      return merged_weight(w, a, b, scale, m)

    depth = _stack_depth(weight)
    if requantize and spec.lora.qa:
      exact = functools.partial(merged_minimum, scale=scale)
      flat[w_key] = _map_stacked(exact, depth)(weight, a, b)
      continue
    args = (weight, a, b) if m is None else (weight, a, b, m)
    merged = _map_stacked(one, depth)(*args).astype(dtype)
    if requantize and spec.quant is not None:
      q = spec.quant

      def requant(w, q=q, path=path):
        return quant.quantize(
          w, q.data_type, q.block_size, q.double_quant, name=path
        )

      merged = _map_stacked(requant, depth)(merged)
    flat[w_key] = merged
  return unflatten(flat)


def unmerge_adapters(merged_variables, adapters, plan: Plan) -> dict:
  """Inverse of `merge_adapters` (float merge, no DoRA): base weights back.

  Args:
    merged_variables: the output of `merge_adapters` (requantize=False).
    adapters: the "params" tree that was merged.
    plan: the plan of the model.
  """
  flat = flatten(merged_variables)
  flat_adapters = flatten({PARAMS: adapters})
  for path in plan.lora_paths():
    spec = plan.lookup(path)
    keys = tuple(path.split("/"))
    if (PARAMS, *keys, "lora_magnitude") in flat_adapters:
      raise ValueError(
        f"cannot unmerge DoRA layer {path}: the merged weight does not "
        "determine the base"
      )
    a = flat_adapters[(PARAMS, *keys, "lora_a")]
    b = flat_adapters[(PARAMS, *keys, "lora_b")]
    w_key = (BASE, *keys, "weight")
    w = flat[w_key]
    in_features = w.shape[-1]
    delta = jnp.swapaxes(full_a(a, in_features) @ b, -1, -2) * spec.lora.scale
    flat[w_key] = (w.astype(jnp.float32) - delta).astype(w.dtype)
    flat[(PARAMS, *keys, "lora_a")] = a
    flat[(PARAMS, *keys, "lora_b")] = b
  return unflatten(flat)
