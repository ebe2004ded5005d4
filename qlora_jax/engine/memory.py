"""What a training step holds, per device, predicted before anything loads.

`estimate` takes a model config, the plan (quantization, adapters), the
training mode, batch and sequence length, remat and the mesh, and returns
a `Breakdown` in bytes:
- weights, gradients and optimizer state: exact, from the abstract shapes
  of the model's variables (`jax.eval_shape`, nothing allocated; packed
  codes and every scale included) and of the optimizer's state, each leaf
  divided over the fsdp axis as `sharding.leaf_spec` splits it;
- activations kept for the backward pass and the largest transient: a
  formula in the step's tensor sizes (per device: tokens N = batch * seq
  / devices, hidden h, MLP width I, heads, vocab V), whose coefficients
  are the live copies of each tensor that XLA's buffer assignment keeps.
  They were measured on XLA:CPU compiles of small Llama-shaped steps
  (`tests/memory_test.py` checks the whole prediction against XLA's
  compiled memory on configs it was not fitted to); GPU and TPU fuse
  differently, so treat their figures as estimates of the same order.

With remat, one hidden state [N, h] per layer is kept; the backward of one
layer recomputes its forward, and that layer's working set (attention
scores [b, heads, s, s], MLP activations [N, I], the dequantized weights)
or one chunk of logits and its gradient [chunk, V] is the transient,
whichever is larger. Without remat every layer keeps its activations (a
quantized base is dequantized again in the backward pass).
"""

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from qlora_jax import models, quant
from qlora_jax import nn as qnn
from qlora_jax.engine import losses, optim, setup, sharding

MiB, GiB = 2**20, 2**30

# Live copies of each per-layer tensor during the backward of one
# rematerialised layer (fitted on XLA:CPU, jax 0.10.2): [N, h], [N, I],
# attention scores (float32), the largest linear weight dequantized (a
# float base needs fewer copies), and a fixed part.
LAYER_COPIES = {"hidden": 14.1, "mlp": 6.1, "scores": 0.5, "fixed": 1 * MiB}
WEIGHT_COPIES = {"quantized": 3.4, "float": 2.6}
# Without remat, kept per layer for the backward pass (in float32 even
# with a bfloat16 compute dtype: XLA:CPU saves upcast values). The
# backward pass dequantizes a quantized base again: no float copy of a
# frozen weight is kept.
SAVED_COPIES = {"hidden": 7.7, "mlp": 2.2, "scores": 0.2}
# One chunk of float32 logits and its gradient.
HEAD_COPIES = 2.0


@dataclasses.dataclass(frozen=True)
class Shape:
  """What the activation formula needs of a model config."""

  hidden: int
  layers: int
  heads: int
  kv_heads: int
  head_dim: int
  intermediate: int
  vocab: int

  @classmethod
  def of(cls, config) -> "Shape":
    heads = config.num_heads
    return cls(
      hidden=config.hidden_size,
      layers=config.num_layers,
      heads=heads,
      kv_heads=getattr(config, "num_kv_heads", heads),
      head_dim=getattr(config, "head_dim", config.hidden_size // heads),
      intermediate=config.intermediate_size,
      vocab=config.vocab_size,
    )

  @property
  def layer_linear_params(self) -> int:
    h, q = self.hidden, self.heads * self.head_dim
    kv = self.kv_heads * self.head_dim
    return h * q + 2 * h * kv + q * h + 3 * h * self.intermediate

  @property
  def largest_linear(self) -> int:
    q = self.heads * self.head_dim
    return max(self.hidden * self.intermediate, self.hidden * q)


@dataclasses.dataclass(frozen=True)
class Breakdown:
  """Bytes per device of one training step."""

  frozen_quantized: int  # packed codes and scales of the frozen base
  frozen_float: int  # frozen weights left in floats (embeddings, norms...)
  trainable: int  # the parameters optax updates
  gradients: int
  optimizer: int  # optimizer state (AdamW: two moments)
  batch: int  # the step's input arrays
  activations: int  # kept for the backward pass
  transient: int  # the largest working set on top of all the above
  # "layer backward", "logits chunk" or "optimizer update" (then
  # activations + transient = the updates tree)
  transient_kind: str
  upcast: int = 0  # a compute-dtype copy of a float base of another dtype
  devices: int = 1
  params: int = 0  # parameters of the model (quantized ones counted whole)
  trainable_params: int = 0

  FIELDS = (
    "frozen_quantized",
    "frozen_float",
    "trainable",
    "gradients",
    "optimizer",
    "batch",
    "activations",
    "upcast",
    "transient",
  )

  @property
  def total(self) -> int:
    return sum(getattr(self, f) for f in self.FIELDS)

  def lines(self) -> list[str]:
    """One line per part and the total, in GiB (MiB under 1 GiB)."""
    out = []
    for f in self.FIELDS:
      name = f.replace("_", " ")
      if f == "transient":
        name += f" ({self.transient_kind})"
      out.append(f"  {name:<30} {format_bytes(getattr(self, f)):>12}")
    per = " per device" if self.devices > 1 else ""
    out.append(f"  {'total' + per:<30} {format_bytes(self.total):>12}")
    return out


def format_bytes(n: float) -> str:
  if abs(n) >= GiB:
    return f"{n / GiB:,.2f} GiB"
  return f"{n / MiB:,.1f} MiB"


def parse_bytes(text: str) -> int:
  """'16GiB', '80 GB', '512MiB', '1024' (bytes) -> bytes.

  Raises:
    ValueError: naming the text.
  """
  units = {"": 1, "b": 1, "kib": 2**10, "mib": MiB, "gib": GiB, "tib": 2**40}
  units.update(kb=10**3, mb=10**6, gb=10**9, tb=10**12)
  s = str(text).strip().lower().replace(" ", "")
  i = len(s)
  while i and not s[i - 1].isdigit():
    i -= 1
  number, unit = s[:i], s[i:]
  try:
    value = float(number)
  except ValueError:
    value = -1.0
  if unit not in units or value <= 0:
    raise ValueError(f"{text!r} is not a memory size (e.g. 16GiB, 80GB)")
  return int(value * units[unit])


def _leaf_bytes(leaf, fsdp: int) -> int:
  """Bytes of one array on one device, sharded as `sharding.leaf_spec`."""
  n = math.prod(leaf.shape) * np.dtype(leaf.dtype).itemsize
  spec = sharding.leaf_spec(leaf.shape, fsdp)
  return n // fsdp if any(a is not None for a in spec) else n


def _tree_bytes(tree, fsdp: int) -> int:
  return sum(_leaf_bytes(x, fsdp) for x in jax.tree_util.tree_leaves(tree))


def _split_frozen(frozen, fsdp: int) -> tuple[int, int]:
  q = f = 0
  for leaf in qnn.flatten(frozen).values():
    if isinstance(leaf, quant.QuantizedTensor):
      q += _tree_bytes(leaf, fsdp)
    else:
      f += _leaf_bytes(leaf, fsdp)
  return q, f


def _layer_bytes(abstract) -> int:
  """Bytes of every variable of the blocks (all layers, unsharded): the
  leaves under a "layers" module, scanned or not."""
  total = 0
  for path, leaf in qnn.flatten(abstract).items():
    if any(p == "layers" or p.startswith("layers_") for p in path):
      total += _tree_bytes(leaf, 1)
  return total


def estimate(
  config,
  *,
  lora: Mapping[str, Any] | None,
  quant_plan: Mapping[str, Any] | None,
  train_patterns: Sequence[str] = (),
  batch: int,
  seq: int,
  remat: bool = True,
  dtype: Any = jnp.float32,
  base_dtype: Any = jnp.float32,
  embed_dtype: Any = None,
  mesh: tuple[int, int] = (1, 1),
  tx: optax.GradientTransformation | None = None,
  task: str = "causal_lm",
  num_labels: int | None = None,
  scan_layers: bool = True,
  platform: str | None = None,
) -> Breakdown:
  """The per-device memory of a training step (see the module docstring).

  Args:
    config: a parsed model config (`models.read_config`, `from_dict`).
    lora, quant_plan: `nn.LoraTargets` / `nn.QuantTargets` (or mappings
      they parse; None: no adapters / a float base).
    train_patterns: base variables that train too (".*" for full
      fine-tuning; then `lora` and `quant_plan` are None).
    batch, seq: the global batch and its sequence length.
    dtype, base_dtype: compute dtype and the dtype a float base is held in.
    embed_dtype: the dtype of the embedding tables (None: `base_dtype`).
    mesh: (data, fsdp); the batch is split over both, weights over fsdp.
    tx: the optimizer (default: AdamW, the engine's).
    scan_layers: build the plan as a scanned model does (the bytes are the
      same either way; per-layer patterns can plan differently).
    platform: "cpu", "gpu" or "tpu" (default: this process's backend):
      XLA:CPU holds a float32 copy of a bfloat16 float base.

  Raises:
    ValueError: the batch does not divide over the devices.
  """
  data, fsdp = mesh
  devices = data * fsdp
  if batch % devices:
    raise ValueError(f"batch {batch} does not divide over {devices} devices")
  dtype, base_dtype = jnp.dtype(dtype), jnp.dtype(base_dtype)
  spec = models.ModelSpec(config, task, num_labels)
  quant_plan = qnn.QuantTargets.parse(quant_plan)
  plan = models.model_plan(spec, lora, quant_plan, scan_layers)
  opts = models.Options(
    plan, dtype, base_dtype, remat, scan_layers, embed_dtype=embed_dtype
  )
  abstract = spec.abstract_variables(opts)
  trainable, frozen = qnn.split_trainable(abstract, train_patterns)
  tx = tx or optax.adamw(1e-4)
  opt_state = jax.eval_shape(tx.init, trainable)
  fq, ff = _split_frozen(frozen, fsdp)
  t_bytes = _tree_bytes(trainable, fsdp)
  s = Shape.of(config)
  cb = dtype.itemsize
  b = batch // devices
  n = b * seq
  on_cpu = (platform or jax.default_backend()) == "cpu"
  # XLA:CPU computes bfloat16 elementwise work in float32: a layer's
  # working set is float32 there whatever the compute dtype.
  ab = 4 if on_cpu else cb
  hidden, mlp = n * s.hidden * ab, n * s.intermediate * ab
  scores = b * s.heads * seq * seq * 4
  quantized = quant_plan is not None
  w = (
    s.largest_linear * cb * WEIGHT_COPIES["quantized" if quantized else "float"]
  )
  layer = (
    LAYER_COPIES["hidden"] * hidden
    + LAYER_COPIES["mlp"] * mlp
    + LAYER_COPIES["scores"] * scores
    + w
    + LAYER_COPIES["fixed"]
  )
  most = max(8, min(n, losses.LM_CHUNK_ELEMENTS // s.vocab))
  chunk, _ = losses.lm_chunks(n, most)
  head = HEAD_COPIES * chunk * s.vocab * 4 if task == "causal_lm" else 0
  if remat:
    saved = s.layers * n * s.hidden * cb  # the hidden state entering each layer
  else:
    saved = s.layers * (
      SAVED_COPIES["hidden"] * n * s.hidden * 4
      + SAVED_COPIES["mlp"] * n * s.intermediate * 4
      + SAVED_COPIES["scores"] * scores
    )
  # A float base held in bfloat16 (or another dtype than the compute
  # dtype) in scanned layers: XLA:CPU slices bfloat16 in float32, so it
  # converts the whole stacked base to float32 once, outside the layer loop
  # (it also computes bfloat16 dots in float32), and a float32 copy of
  # every frozen linear weight exists during the step.
  upcast = 0
  narrow = base_dtype.itemsize < 4
  if (
    not quantized
    and not train_patterns
    and (base_dtype != dtype or (on_cpu and narrow))
  ):
    up_bytes = 4 if on_cpu else cb
    upcast = s.layers * s.layer_linear_params * up_bytes // fsdp
  # A tied head over a 16-bit table with float32 matmuls upcasts the table
  # a chunk of rows at a time (`nn.upcast_matmul`): one chunk buffer in the
  # forward loop and one in the backward.
  table_dtype = base_dtype if embed_dtype is None else jnp.dtype(embed_dtype)
  if (
    task == "causal_lm"
    and getattr(config, "tie_word_embeddings", False)
    and table_dtype.itemsize == 2
    and cb == 4
  ):
    upcast += 2 * min(s.vocab * s.hidden, qnn.matmul.CHUNK_ELEMENTS) * 4
  if fsdp > 1:  # one layer's weights gathered whole from their shards
    layer += _layer_bytes(abstract) / s.layers
  kind = "layer backward" if layer >= head else "logits chunk"
  transient = max(layer, head)
  # After the backward pass its activations are gone, and the optimizer
  # forms the updates (one trainable-sized tree) before applying them: that
  # is the peak when the trainable tree outweighs the activations (full
  # fine-tuning of a large model; measured at 1B by bench_scale).
  if t_bytes > saved + transient:
    transient, kind = t_bytes - saved, "optimizer update"
  return Breakdown(
    frozen_quantized=fq,
    frozen_float=ff,
    trainable=t_bytes,
    gradients=t_bytes,
    optimizer=_tree_bytes(opt_state, fsdp),
    batch=5 * n * 4,
    activations=int(saved),
    transient=int(transient),
    transient_kind=kind,
    upcast=int(upcast),
    devices=devices,
    params=qnn.num_params(abstract),
    trainable_params=qnn.num_params(trainable),
  )


def estimate_settings(
  s,
  config,
  devices: int,
  num_labels: int | None = None,
  platform: str | None = None,
) -> Breakdown:
  """`estimate` for a run's `Settings` over `devices` devices (mesh and
  micro-batches as the engine builds them; AdamW as `optim` makes it). A
  DPO step (train.objective "dpo") runs a chosen and a rejected sequence
  per pair: `rows_per_example` rows (its reference log-probs are computed
  before training, two floats per pair); a GRPO step runs grpo.group_size
  completions per prompt, and its batch holds per-token log-probs of the
  sampling policy (grpo.mu > 1) and of the reference (grpo.beta > 0),
  float32 [rows, seq] each (seq: data.max_length, a bound). Generation
  runs between steps, and its KV cache is gone before a step starts."""
  data, fsdp = s.mesh.data, s.mesh.fsdp
  if fsdp == -1:
    fsdp = devices // max(1, data)
  if data == -1:
    data = devices // max(1, fsdp)
  tx, _ = optim.make_optimizer(s.opt, 1)
  accum = s.train.grad_accum
  o = setup.model_options(s, num_labels)
  p = estimate(
    config,
    lora=o.lora,
    quant_plan=o.quant,
    train_patterns=s.train_patterns(),
    batch=rows_per_example(s) * s.train.batch_size // accum,
    seq=s.data.max_length,
    remat=o.remat,
    dtype=o.dtype,
    base_dtype=o.base_dtype,
    embed_dtype=o.embed_dtype,
    mesh=(data, fsdp),
    tx=tx,
    task=o.task,
    num_labels=num_labels,
    scan_layers=o.scan_layers,
    platform=platform,
  )
  if accum > 1:  # the micro-batches' gradients are summed in a buffer
    p = dataclasses.replace(p, gradients=2 * p.gradients)
  if s.train.objective == "grpo":
    rows = rows_per_example(s) * s.train.batch_size // (data * fsdp)
    logps = (int(s.grpo.mu > 1) + int(s.grpo.beta > 0)) * rows
    logps *= s.data.max_length * 4
    p = dataclasses.replace(p, batch=p.batch + logps + 4 * rows)
  return p


def rows_per_example(s) -> int:
  """Sequences a step runs per example of train.batch_size: 2 for DPO's
  pairs, grpo.group_size for GRPO's groups, else 1."""
  if s.train.objective == "grpo":
    return s.grpo.group_size
  return 2 if s.train.objective == "dpo" else 1
