"""Weight and output error of every data type and bit width on a checkpoint.

python -m experiments.quant_error [--checkpoint minilm] --workdir DIR
  [--texts 64] [--block_sizes 64] [--extra_block_sizes 32,128,256]

For each setting (NF-k, Int-k for k in 2..8, FP4, FP8; with and without
double quantization; NF4 at other block sizes too) it writes a point under
DIR/points/ like a sweep does, so `python -m experiments.tables --sweep DIR`
renders the table and figures.
"""

import json
import pathlib
import re

from absl import app, flags

from qlora_jax import build, quant_error, sweep

_CHECKPOINT = flags.DEFINE_string("checkpoint", "minilm", "Checkpoint folder.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Output directory.")
_TEXTS = flags.DEFINE_integer("texts", 64, "Held-out sentences.")
_BLOCK = flags.DEFINE_integer("block_size", 64, "Block size of the grid.")
_EXTRA = flags.DEFINE_list("extra_block_sizes", ["32", "128", "256"], "NF4.")
flags.mark_flag_as_required("workdir")

DATA_TYPES = [f"int{k}" for k in (2, 3, 4, 5, 6, 8)] + ["fp4", "fp8"]
DATA_TYPES += [f"nf{k}" for k in (2, 3, 4, 5, 6, 8)]


def settings(block: int, extra: list[int]) -> list[quant_error.Setting]:
  out = [
    quant_error.Setting(dt, block, dq)
    for dt in DATA_TYPES
    for dq in (False, True)
  ]
  out += [quant_error.Setting("nf4", b, True) for b in extra if b != block]
  return out


def table(encoder: bool) -> dict:
  output = (
    [
      ["embedding_cosine", "emb. cosine", "f5"],
      ["embedding_cosine_min", "min cosine", "f4"],
    ]
    if encoder
    else [
      ["logits_relative_error", "logits rel. err.", "f4"],
      ["kl_divergence", "KL", "sci"],
      ["top1_agreement", "top-1 agree", "pct"],
    ]
  )
  y_out = "embedding_error" if encoder else "kl_divergence"
  return {
    "title": "Data types: weight error, output error and bits per parameter",
    "rows": ["family", "data type", "double quant", "block"],
    "metrics": [
      ["bits_per_param", "bits/param", "bits"],
      ["weight_mean_abs_error", "mean |dW|", "sci"],
      ["weight_relative_error", "rel. weight err.", "f4"],
      *output,
    ],
    "figures": [
      {
        "kind": "xy",
        "file": "weight_error_vs_bits.png",
        "x": "bits_per_param",
        "y": "weight_relative_error",
        "series": "family",
        "logy": True,
      },
      {
        "kind": "xy",
        "file": "output_error_vs_bits.png",
        "x": "bits_per_param",
        "y": y_out,
        "series": "family",
        "logy": True,
      },
    ],
  }


def main(argv):
  del argv
  checkpoint = build.resolve_checkpoint(_CHECKPOINT.value)
  out = pathlib.Path(_WORKDIR.value)
  grid = settings(_BLOCK.value, [int(b) for b in _EXTRA.value])
  texts = quant_error.sample_texts(_TEXTS.value, out / "texts")
  results = quant_error.measure(checkpoint, grid, texts)
  points = []
  for s in grid:
    family = re.match(r"[a-z]+", s.data_type).group(0).upper()
    family = {"NF": "NF", "INT": "Int", "FP": "FP"}[family]
    labels = {
      "family": family,
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
    (workdir / sweep.DONE).write_text(json.dumps(metrics, indent=2))
    print(
      f"{s.name:<14} {metrics['bits_per_param']:.3f} bits/param, "
      f"weight rel. error {metrics['weight_relative_error']:.4f}"
    )
  encoder = "embedding_cosine" in results[grid[0].name]
  sweep.write_layout(out, points, table(encoder))


if __name__ == "__main__":
  app.run(main)
