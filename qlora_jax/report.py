"""What a run prints: the pipeline summary, a per-eval table, predictions."""

import dataclasses
import json
import pathlib
from typing import Any

import jax
import numpy as np

from qlora_jax import nn as qnn
from qlora_jax import quant, tasks


@dataclasses.dataclass
class Summary:
  lines: list[str]
  numbers: dict[str, Any]


def _mb(n: int) -> str:
  return f"{n / 1e6:,.1f} MB"


def _millions(n: int) -> str:
  return f"{n / 1e6:,.2f}M" if n >= 1e5 else f"{n:,}"


def _float_bytes(tree) -> int:
  """Bytes of `tree` with every quantized tensor counted in its float dtype."""
  total = 0
  for leaf in qnn.flatten(tree).values():
    if isinstance(leaf, quant.QuantizedTensor):
      stack = int(np.prod(leaf.codes.shape[:-1], dtype=np.int64))
      total += stack * leaf.size * np.dtype(leaf.dtype).itemsize
    else:
      total += int(np.prod(leaf.shape)) * np.dtype(leaf.dtype).itemsize
  return total


def _linear_only(tree) -> dict:
  flat = qnn.flatten(tree)
  return qnn.unflatten({k: v for k, v in flat.items() if k[-1] == "weight"})


def base_record(config) -> dict:
  """What the frozen base of a run is made of (saved with checkpoints)."""
  q = config.quant
  return {
    "checkpoint": config.model.checkpoint or "random init",
    "quant": q.data_type,
    "block_size": int(q.block_size),
    "double_quant": bool(q.double_quant),
  }


def pipeline_summary(config, loaded, trainable, frozen) -> Summary:
  variables = loaded.variables
  base = variables.get(qnn.BASE, {})
  new = variables.get(qnn.PARAMS, {})
  n_base = qnn.num_params(base)
  n_all = n_base + qnn.num_params(new)
  n_train = qnn.num_params(trainable)
  plan = loaded.plan
  linear = _linear_only(base)
  before, after = _float_bytes(base), qnn.num_bytes(base)
  lin_before, lin_after = _float_bytes(linear), qnn.num_bytes(linear)
  lin_params = qnn.num_params(linear)
  bits = 8 * lin_after / max(lin_params, 1)
  name = config.model.checkpoint or "random init"
  q = config.quant
  quant_desc = (
    "float (no quantization)"
    if q.data_type == "none"
    else f"{q.data_type}, block {q.block_size}"
    + (" + double quant" if q.double_quant else "")
  )
  lines = [
    f"base model       {name} ({loaded.config.model_type}): "
    f"{_millions(n_base)} parameters",
    f"linear layers    {len(plan.lora_paths())} with adapters, "
    f"{len(plan.quant_paths())} quantized ({quant_desc})",
    f"trainable        {_millions(n_train)} of {_millions(n_all)} "
    f"({100 * n_train / max(n_all, 1):.2f}%), mode {config.train.mode}",
    f"base bytes       {_mb(before)} as floats -> {_mb(after)} stored",
    f"linear layers    {_mb(lin_before)} -> {_mb(lin_after)} "
    f"({bits:.3f} bits/param)",
  ]
  numbers = {
    "base_params": n_base,
    "trainable_params": n_train,
    "trainable_fraction": n_train / max(n_all, 1),
    "base_bytes_float": before,
    "base_bytes_stored": after,
    "linear_bytes_float": lin_before,
    "linear_bytes_stored": lin_after,
    "linear_bits_per_param": bits,
  }
  return Summary(lines, numbers)


def show(summary: Summary) -> None:
  if jax.process_index() == 0:
    print("\n".join(summary.lines), flush=True)
    print(
      f"{'step':>10} {'train loss':>11} {'eval loss':>10} {'eval acc':>9}",
      flush=True,
    )


def epoch_line(step: int, total: int, train_loss: float, m: dict) -> None:
  if jax.process_index() == 0:
    extra = f" {m['perplexity']:>9.2f} ppl" if "perplexity" in m else ""
    print(
      f"{step:>5}/{total:<4} {train_loss:>11.4f} {m['loss']:>10.4f} "
      f"{m['accuracy']:>9.4f}{extra}",
      flush=True,
    )


def write_predictions(path: pathlib.Path, run_data, predictions) -> None:
  names = run_data.label_map.names if run_data.label_map else None
  labels = np.asarray(run_data.eval["labels"])
  with path.open("w") as f:
    for i, (pred, prob) in enumerate(
      zip(predictions["predicted"], predictions["probability"], strict=True)
    ):
      record = {
        "text": run_data.eval_texts[i],
        "label": names[int(labels[i])] if names else int(labels[i]),
        "predicted": names[int(pred)] if names else int(pred),
        "probability": float(prob),
      }
      f.write(json.dumps(record) + "\n")


def finish(workdir, task, eval_metrics, run_data, predictions, config) -> None:
  if jax.process_index() != 0:
    return
  shown = int(config.train.get("show_predictions", 5))
  if task == tasks.CLASSIFICATION and predictions and shown:
    names = run_data.label_map.names
    labels = np.asarray(run_data.eval["labels"])
    print("predictions (eval):")
    step = max(1, len(labels) // shown)
    for i in range(0, min(len(labels), step * shown), step):
      text = run_data.eval_texts[i].replace("\n", " ")
      text = text if len(text) <= 70 else text[:67] + "..."
      pred = names[int(predictions["predicted"][i])]
      mark = "ok " if pred == names[int(labels[i])] else "err"
      print(f"  {mark} {pred:<11} (label {names[int(labels[i])]:<11}) {text}")
  final = ", ".join(f"{k} {v:.4f}" for k, v in eval_metrics.items())
  print(f"final eval: {final}")
  print(f"checkpoints: {workdir / 'checkpoints'}")
  print(f"metrics:     {workdir / 'metrics.jsonl'} (+ tensorboard/)")
  print(f"curves:      {workdir / 'curves.png'}")
  if task == tasks.CLASSIFICATION:
    print(f"predictions: {workdir / 'predictions.jsonl'}")
