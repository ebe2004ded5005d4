"""How much a data type costs: weight error per layer, output error, bits.

For each quantization setting (data type, block size, double quant) every
linear weight of a checkpoint is quantized and compared with its float
value, and the whole model's output is compared with the float model's on
real text: the cosine of sentence embeddings for encoders, the relative
error and KL divergence of next-token distributions for decoders.
"""

import dataclasses
import json
import pathlib
import re
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from qlora_jax import data, models, quant
from qlora_jax import nn as qnn
from qlora_jax.ablations import sweep
from qlora_jax.ablations.results import DONE


@dataclasses.dataclass(frozen=True)
class Setting:
  data_type: str
  block_size: int = 64
  double_quant: bool = False

  @property
  def name(self) -> str:
    dq = "+dq" if self.double_quant else ""
    return f"{self.data_type}{dq}-b{self.block_size}"

  def config(self) -> dict:
    return {
      "data_type": self.data_type,
      "block_size": self.block_size,
      "double_quant": self.double_quant,
    }


def linear_weights(variables) -> dict[str, jnp.ndarray]:
  """{path: float weight [out, in]} of every linear layer (unstacked)."""
  out = {}
  for path, leaf in qnn.flatten(variables[qnn.BASE]).items():
    if path[-1] == "weight" and not isinstance(leaf, quant.QuantizedTensor):
      out["/".join(path[:-1])] = leaf
  return out


def weight_errors(weights: dict, s: Setting) -> tuple[dict, dict]:
  """(metrics, {path: QuantizedTensor}): per layer mean |W - Q(W)| and
  relative Frobenius error, their totals, and bits per parameter."""
  per_layer, quantized = {}, {}
  abs_sum = sq_err = sq_ref = bits = n = 0.0
  for path, w in weights.items():
    qt = quant.quantize(w, s.data_type, s.block_size, s.double_quant, path)
    quantized[path] = qt
    err = quant.dequantize(qt, jnp.float32) - w.astype(jnp.float32)
    layer_abs = float(jnp.mean(jnp.abs(err)))
    layer_sq = float(jnp.sum(err * err))
    layer_ref = float(jnp.sum(jnp.square(w.astype(jnp.float32))))
    per_layer[path] = {
      "mean_abs_error": layer_abs,
      "relative_error": float(np.sqrt(layer_sq / layer_ref)),
    }
    abs_sum += layer_abs * w.size
    sq_err += layer_sq
    sq_ref += layer_ref
    bits += quant.memory_report(qt).total_bytes * 8
    n += w.size
  metrics = {
    "weight_mean_abs_error": abs_sum / n,
    "weight_relative_error": float(np.sqrt(sq_err / sq_ref)),
    "bits_per_param": bits / n,
    "layers": per_layer,
  }
  return metrics, quantized


def sample_texts(n: int, folder: pathlib.Path) -> list[str]:
  """Held-out real text: the default task's eval docstrings."""
  _, eval_path = data.write_stdlib_docstrings(folder)
  examples = data.read_classification_jsonl(eval_path)
  return [e.text for e in examples[:n]]


def output_error(reference, quantized, segments, is_encoder) -> dict:
  """Embedding cosine (encoders) or logit error and KL (decoders)."""
  if is_encoder:
    cos = jnp.sum(reference * quantized, -1) / (
      jnp.linalg.norm(reference, axis=-1) * jnp.linalg.norm(quantized, axis=-1)
    )
    return {
      "embedding_cosine": float(jnp.mean(cos)),
      "embedding_cosine_min": float(jnp.min(cos)),
    }
  mask = (segments > 0)[..., None]
  diff = jnp.where(mask, reference - quantized, 0.0)
  rel = jnp.linalg.norm(diff) / jnp.linalg.norm(jnp.where(mask, reference, 0))
  logp = jax.nn.log_softmax(reference)
  logq = jax.nn.log_softmax(quantized)
  kl = jnp.sum(jnp.exp(logp) * (logp - logq), -1)
  m = segments > 0
  agree = jnp.argmax(reference, -1) == jnp.argmax(quantized, -1)
  return {
    "logits_relative_error": float(rel),
    "kl_divergence": float(jnp.sum(kl * m) / jnp.sum(m)),
    "top1_agreement": float(jnp.sum(agree * m) / jnp.sum(m)),
  }


def quantized_model(spec, variables, quantized: dict, s: Setting):
  """The model with every linear layer quantized, reusing `quantized`."""
  plan = models.model_plan(spec, None, s.config(), False)
  model = spec.build(models.Options(plan))
  flat = qnn.flatten(variables)
  for path in plan.quant_paths():
    flat[(qnn.BASE, *path.split("/"), "weight")] = quantized[path]
  return model, qnn.unflatten(flat)


def measure(
  checkpoint: str | pathlib.Path,
  settings: Sequence[Setting],
  texts: Sequence[str],
  max_length: int = 128,
) -> dict[str, dict]:
  """{setting name: metrics}: weight errors of every linear layer, output
  error of the model with all of them quantized (output heads excluded)."""
  checkpoint = pathlib.Path(checkpoint)
  config = models.read_config(checkpoint / "config.json")
  is_encoder = isinstance(config, models.BertConfig)
  spec = models.ModelSpec(config, "embedding" if is_encoder else "causal_lm")
  tokenizer = data.Tokenizer.load(checkpoint)
  # Learned position tables (BERT, GPT-2) bound the length.
  max_length = min(max_length, getattr(config, "max_positions", max_length))
  rows = tokenizer.encode_batch(list(texts), max_length=max_length)
  length = max(len(r) for r in rows)
  ids = np.zeros((len(rows), length), np.int32)
  segments = np.zeros((len(rows), length), np.int32)
  for i, r in enumerate(rows):
    ids[i, : len(r)] = r
    segments[i, : len(r)] = 1
  ids, segments = jnp.asarray(ids), jnp.asarray(segments)
  base = models.from_pretrained(checkpoint, task=spec.task)
  apply = jax.jit(lambda m, v: m.apply(v, ids, segments), static_argnums=0)
  reference = apply(base.model, base.variables)
  weights = {
    p: w
    for p, w in linear_weights(base.variables).items()
    if p not in spec.heads
  }
  results = {}
  for s in settings:
    metrics, quantized = weight_errors(weights, s)
    model, variables = quantized_model(spec, base.variables, quantized, s)
    out = apply(model, variables)
    metrics.update(output_error(reference, out, segments, is_encoder))
    metrics["bits"] = quant.get_data_type(s.data_type).bits
    results[s.name] = metrics
  return results


def grid(
  data_types: Sequence[str],
  double_quant: Sequence[bool],
  block_size: int,
  extra_block_sizes: Sequence[int],
) -> list[Setting]:
  """Every data type at `block_size` each way, then NF4 + DQ at the extra
  block sizes."""
  out = [
    Setting(dt, block_size, dq) for dt in data_types for dq in double_quant
  ]
  out += [Setting("nf4", b, True) for b in extra_block_sizes if b != block_size]
  return out


_FAMILIES = {"nf": "NF", "int": "Int", "fp": "FP"}


def family(data_type: str) -> str:
  """ "NF", "Int" or "FP": the series a data type is drawn in."""
  return _FAMILIES[re.match(r"[a-z]+", data_type).group(0)]


def write_points(
  out: pathlib.Path,
  settings: Sequence[Setting],
  results: dict[str, dict],
  table: Callable[[bool], dict],
) -> list[str]:
  """Writes each setting as a done sweep point (with its per-layer errors)
  and the table layout; returns one summary line per setting."""
  points, lines = [], []
  for s in settings:
    labels = {
      "family": family(s.data_type),
      "data type": s.data_type,
      "double quant": s.double_quant,
      "block": s.block_size,
    }
    point = sweep.Point(labels, {})
    points.append(point)
    workdir = out / "points" / point.slug
    sweep.write_point(workdir, point)
    metrics = dict(results[s.name])
    layers = metrics.pop("layers")
    if "embedding_cosine" in metrics:
      metrics["embedding_error"] = 1.0 - metrics["embedding_cosine"]
    (workdir / "layers.json").write_text(json.dumps(layers, indent=1))
    (workdir / DONE).write_text(json.dumps(metrics, indent=2))
    lines.append(
      f"{s.name:<14} {metrics['bits_per_param']:.3f} bits/param, "
      f"weight rel. error {metrics['weight_relative_error']:.4f}"
    )
  encoder = "embedding_cosine" in results[settings[0].name]
  sweep.write_layout(out, points, table(encoder))
  return lines
