"""LoRA adapter specs and initialisation (PEFT kaiming, gaussian, PiSSA, LoftQ).

Layouts: the frozen base `weight` is [out, in] (PyTorch's, so that it is
quantized in bitsandbytes' order); the adapter computes `x @ lora_a @ lora_b`
with `lora_a` [in, r] and `lora_b` [r, out] (PEFT's lora_A.weight and
lora_B.weight transposed). The update of the base is
`scale * (lora_a @ lora_b).T`.

QA-LoRA (Xu et al., 2023; `qa=True`, over an asymmetric `int<k>_asym`
base with blocks of L): the adapter's input is the mean of x over each
block of L input features, so `lora_a` is [in / L, r]. Its update is
`scale * (full_a(lora_a) @ lora_b).T` with `full_a` repeating each row of
A over its block, divided by L: constant over each block of a row, i.e. a
change of that block's minimum only, which `nn.merge` folds in exactly.
"""

import dataclasses
import math

import jax
import jax.numpy as jnp

from qlora_jax import quant

INITS = ("kaiming", "gaussian", "pissa", "loftq")


@dataclasses.dataclass(frozen=True)
class LoraSpec:
  """One layer's adapter.

  Attributes:
    rank: r.
    alpha: scale numerator: scale = alpha / r (alpha / sqrt(r) with rslora);
      finite and not 0 (at 0 the adapter would be a no-op).
    rslora: use rank-stabilised scaling.
    dropout: dropout rate on the adapter input.
    init: "kaiming" (PEFT's default: A kaiming-uniform, B = 0), "gaussian"
      (A ~ N(0, 1/r), B = 0), "pissa" (top-r SVD of the base; the base keeps
      the residual) or "loftq" (alternating quantize / SVD).
    loftq_iters: alternating steps of LoftQ.
    dora: weight-decomposed LoRA (a trainable magnitude per output).
    qa: quantization-aware (QA-LoRA): A acts on block means of the input.
  """

  rank: int = 8
  alpha: float = 16.0
  rslora: bool = False
  dropout: float = 0.0
  init: str = "kaiming"
  loftq_iters: int = 1
  dora: bool = False
  qa: bool = False

  def __post_init__(self):
    SpecError = quant.SpecError
    if isinstance(self.rank, bool) or not isinstance(self.rank, int):
      raise SpecError("rank", f"expected a whole number, got {self.rank!r}")
    if self.rank < 1:
      raise SpecError("rank", f"must be >= 1, got {self.rank}")
    if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)):
      raise SpecError("alpha", f"expected a number, got {self.alpha!r}")
    if not math.isfinite(self.alpha) or self.alpha == 0:
      raise SpecError(
        "alpha",
        f"must be finite and not 0, got {self.alpha}: the update is scaled "
        "by alpha / r, so alpha 0 makes the adapter a no-op (lora_a and "
        "lora_b never train)",
      )
    if self.init not in INITS:
      raise SpecError(
        "init", f"unknown lora init {self.init!r}: expected one of {INITS}"
      )
    if not 0.0 <= self.dropout < 1.0:
      raise SpecError("dropout", f"must be in [0, 1), got {self.dropout}")
    if self.loftq_iters < 1:
      raise SpecError("loftq_iters", f"must be >= 1, got {self.loftq_iters}")
    if self.qa and (self.dora or self.init not in ("kaiming", "gaussian")):
      raise SpecError(
        "qa",
        "QA-LoRA changes block minimums only: it takes init 'kaiming' or "
        f"'gaussian' and no dora (got init {self.init!r}, dora {self.dora})",
      )

  @property
  def scale(self) -> float:
    root = math.sqrt(self.rank) if self.rslora else self.rank
    return float(self.alpha) / root


def full_a(a: jnp.ndarray, in_features: int) -> jnp.ndarray:
  """The [in, r] A of an adapter: `a` itself, or a QA-LoRA A [in / L, r]
  spread over its blocks (each row repeated L times, divided by L)."""
  groups = a.shape[-2]
  if groups == in_features:
    return a
  size = in_features // groups
  return jnp.repeat(a, size, axis=-2) / size


def check_qa(lora: LoraSpec, qspec, in_features: int, name: str) -> int:
  """The block size L of a QA-LoRA layer; raises naming the layer when its
  base is not asymmetric or L does not divide its input width."""
  what = name or "layer"
  if qspec is None or not qspec.asymmetric:
    dtype = qspec.data_type if qspec is not None else "none (float)"
    raise ValueError(
      f"lora qa of {what}: QA-LoRA needs an asymmetric quantized base "
      f"(quant.data_type 'int4_asym' or another 'int<k>_asym'), got {dtype!r}"
    )
  if in_features % qspec.block_size:
    raise ValueError(
      f"lora qa of {what}: blocks of {qspec.block_size} do not divide its "
      f"{in_features} input features"
    )
  return qspec.block_size


def _store_base(w, qspec: quant.QuantSpec | None, dtype, name: str):
  """`w` rounded to `dtype` (through float32), quantized per `qspec`."""
  if w.dtype != jnp.dtype(dtype):
    w = w.astype(jnp.float32).astype(dtype)
  if qspec is None:
    return w
  return quant.quantize(
    w,
    qspec.data_type,
    qspec.block_size,
    qspec.double_quant,
    name=name,
  )


def _restored(stored, qspec) -> jnp.ndarray:
  if qspec is None:
    return stored.astype(jnp.float32)
  return quant.dequantize(stored, jnp.float32)


def _svd_factors(residual: jnp.ndarray, rank: int, scale: float):
  """a [in, r], b [r, out] with scale * (a @ b).T the best rank-r fit."""
  u, s, vt = jnp.linalg.svd(residual, full_matrices=False)
  root = jnp.sqrt(s[:rank] / scale)
  b = (u[:, :rank] * root).T  # [r, out]
  a = vt[:rank].T * root  # [in, r]
  return a, b


def init_adapter(
  key: jax.Array,
  weight: jnp.ndarray,
  lora: LoraSpec | None,
  qspec: quant.QuantSpec | None,
  base_dtype=jnp.float32,
  name: str = "",
) -> dict:
  """Frozen base and adapter variables of one layer from its float weight.

  Args:
    key: PRNG key for the random inits.
    weight: float [out, in] base weight.
    lora: the adapter, or None for no adapter.
    qspec: how to quantize the base, or None to keep it in `base_dtype`.
    base_dtype: storage dtype of the float base (and the dtype the quantizer
      sees, so bf16 weights quantize as bitsandbytes quantizes bf16).
    name: the layer's path, for error messages.

  Returns:
    {"weight": stored base} plus, with an adapter, "lora_a", "lora_b" (and
    "lora_magnitude" for DoRA), all float32.
  """
  out_f, in_f = weight.shape
  if lora is None:
    return {"weight": _store_base(weight, qspec, base_dtype, name)}
  if lora.rank > min(in_f, out_f):
    raise ValueError(
      f"lora rank {lora.rank} of {name or 'layer'} exceeds its smallest "
      f"dimension ({in_f} in, {out_f} out)"
    )
  r, scale = lora.rank, lora.scale
  a_rows = in_f // check_qa(lora, qspec, in_f, name) if lora.qa else in_f
  if lora.init == "kaiming":
    bound = 1.0 / math.sqrt(a_rows)  # kaiming_uniform(a=sqrt(5)) on [r, in]
    a = jax.random.uniform(key, (a_rows, r), jnp.float32, -bound, bound)
    b = jnp.zeros((r, out_f), jnp.float32)
    stored = _store_base(weight, qspec, base_dtype, name)
  elif lora.init == "gaussian":
    a = jax.random.normal(key, (a_rows, r), jnp.float32) / r
    b = jnp.zeros((r, out_f), jnp.float32)
    stored = _store_base(weight, qspec, base_dtype, name)
  elif lora.init == "pissa":
    w = jnp.asarray(weight, jnp.float32)
    a, b = _svd_factors(w, r, scale)
    stored = _store_base(w - scale * (a @ b).T, qspec, base_dtype, name)
  else:  # loftq
    w = jnp.asarray(weight, jnp.float32)
    if qspec is None:
      raise ValueError(
        f"lora init 'loftq' of {name or 'layer'} needs a quantized base"
      )
    a = jnp.zeros((in_f, r), jnp.float32)
    b = jnp.zeros((r, out_f), jnp.float32)
    for _ in range(lora.loftq_iters):
      stored = _store_base(w - scale * (a @ b).T, qspec, base_dtype, name)
      a, b = _svd_factors(w - _restored(stored, qspec), r, scale)
  out = {"weight": stored, "lora_a": a, "lora_b": b}
  if lora.dora:
    merged = _restored(stored, qspec) + scale * (a @ b).T
    out["lora_magnitude"] = jnp.linalg.norm(merged, axis=1)
  return out
