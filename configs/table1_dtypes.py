"""Table 1, data types: weight and output error of every data type and width.

python -m experiments.quant_error --config configs/table1_dtypes.py --workdir results/table1
python -m experiments.tables --sweep results/table1

Post-training quantization of every linear layer of a checkpoint (default:
the real MiniLM-L6) with NF-k and Int-k for k in 2..8, FP4 and FP8, each
with and without double quantization (block 64), and NF4 + DQ at blocks 32,
128 and 256: weight errors, bits per parameter, and the model's output
error on held-out real text (sentence-embedding cosine for encoders; logit
error, KL and top-1 agreement of next-token distributions for decoders).
On 2 CPU cores: about 2 minutes for MiniLM-L6 (results/table1/README.md).
"""

from ml_collections import config_dict

WIDTHS = (2, 3, 4, 5, 6, 8)


def get_config() -> config_dict.ConfigDict:
  c = config_dict.ConfigDict()
  c.checkpoint = "minilm"  # a Hugging Face folder, or "minilm"
  c.texts = 64  # held-out eval docstrings of the main job's task
  c.max_length = 128  # tokens per text
  c.block_size = 64  # block of every data type of the grid
  c.extra_block_sizes = [32, 128, 256]  # NF4 + double quant at these too
  c.data_types = (
    [f"int{k}" for k in WIDTHS] + ["fp4", "fp8"] + [f"nf{k}" for k in WIDTHS]
  )
  c.double_quant = [False, True]  # each data type both ways
  return c


def get_table(encoder: bool) -> dict:
  """The table and figures; the output columns depend on the model kind."""
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
