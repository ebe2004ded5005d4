"""The output head of decoding: the model's float head, or a Q8_0 copy of
it read by the CPU kernel (llama.cpp's head for GGUF files).

A batch-1 decoding step of a small model reads its float32 head (vocab x
hidden) more than its 4-bit body: SmolLM2-135M's tied head is 113 MB a
token, its NF4 body 55 MB. Q8_0 (int8 codes, a float16 scale per block of
32) reads 8.5 bits a weight, and `nn.matmul_q8_0` multiplies by d * q
without writing W.

`head` names the decoding head: "float" (the model's own), "q8_0" (the
head weight quantized by ggml's rule; an error where the kernel cannot
run or the head is not a plain float matrix) or "auto": "q8_0" only where
that changes no weight (the float head equals its Q8_0 copy exactly, as a
GGUF file's Q8_0 table read to float does), the compute dtype is float32
and the kernel runs vectorized (AVX2 or better) on the one CPU device;
"float" otherwise. The copy is
made once per head array and kept while that array lives. Training and
scoring never use it: only generation asks for it.
"""

import weakref

import jax
import jax.numpy as jnp

from qlora_jax import quant
from qlora_jax.nn import cpu_matmul

HEADS = ("auto", "float", "q8_0")

# id(head weight) -> (weak reference to it, its Q8_0 copy or None, whether
# the copy holds the same values).
_COPIES: dict[int, tuple[weakref.ref, quant.Q8_0Tensor | None, bool]] = {}


def head_weight(model, variables) -> tuple[jax.Array | None, str | None]:
  """(the float head weight [vocab, hidden] of a decoder, None), or (None,
  why it has none: a quantized or adapted lm_head)."""
  base = variables.get("base", {})
  if model.config.tie_word_embeddings:
    table = base
    for key in model.TIED_HEAD:
      table = table[key]
    return table, None
  if "lm_head" in variables.get("params", {}):
    return None, "lm_head has trainable parameters (adapters)"
  weight = base["lm_head"]["weight"]
  if isinstance(weight, quant.QuantizedTensor):
    return None, f"lm_head is quantized ({weight.data_type})"
  return weight, None


def _why_not(weight) -> str | None:
  """Why the Q8_0 head cannot run for this head weight, or None."""
  if jax.default_backend() != "cpu" or jax.device_count() != 1:
    return (
      f"the kernel runs on one CPU device, not {jax.device_count()} "
      f"{jax.default_backend()} device(s)"
    )
  reason = cpu_matmul.unavailable()
  if reason is not None:
    return f"the CPU kernel is unavailable: {reason}"
  if weight.ndim != 2 or weight.shape[1] % quant.q8_0.BLOCK:
    return (
      f"the head {tuple(weight.shape)} is not made of rows of whole blocks "
      f"of {quant.q8_0.BLOCK}"
    )
  return None


@jax.jit
def _quantize(weight: jax.Array) -> tuple[quant.Q8_0Tensor, jax.Array]:
  """The Q8_0 copy of `weight` and whether it holds the same values."""
  q = quant.quantize_q8_0(weight)
  exact = jnp.all(quant.dequantize_q8_0(q) == weight.astype(jnp.float32))
  return q, exact


def _copy(weight: jax.Array, keep: bool) -> tuple[quant.Q8_0Tensor, bool]:
  """`_quantize(weight)`, computed once per live array; a copy that
  differs from the weight is kept only when asked for (`keep`)."""
  key = id(weight)
  hit = _COPIES.get(key)
  if hit is not None and hit[0]() is weight and hit[1] is not None:
    return hit[1], hit[2]
  q, exact = _quantize(weight)
  exact = bool(exact)
  ref = weakref.ref(weight, lambda _: _COPIES.pop(key, None))
  _COPIES[key] = (ref, q if exact or keep else None, exact)
  return q, exact


def decode_head(head: str, model, variables) -> quant.Q8_0Tensor | None:
  """The Q8_0 head to decode with, or None for the model's float head.

  Raises:
    ValueError: an unknown `head`, or "q8_0" where it cannot run (the
      reason named).
  """
  if head not in HEADS:
    raise ValueError(f"head {head!r}: expected one of {HEADS}")
  if head == "float":
    return None
  weight, reason = head_weight(model, variables)
  if reason is None:
    reason = _why_not(weight)
  if head == "q8_0":
    if reason is not None:
      raise ValueError(f"head 'q8_0' cannot run: {reason} (use 'auto')")
    if isinstance(weight, jax.core.Tracer):  # inside a jit: once per program
      return quant.quantize_q8_0(weight)
    return _copy(weight, keep=True)[0]
  # "auto": only where the weights stay the same.
  if reason is not None or isinstance(weight, jax.core.Tracer):
    return None
  if jnp.dtype(model.opts.dtype) != jnp.float32:
    return None
  if cpu_matmul.isa_of() == "generic":  # plain loops: slower than XLA's dot
    return None
  hit = _COPIES.get(id(weight))
  if hit is not None and hit[0]() is weight and not hit[2]:
    return None  # known to differ
  q, exact = _copy(weight, keep=False)
  return q if exact else None
