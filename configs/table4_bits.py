"""Table 4, bit width: where does k-bit QLoRA stop matching float LoRA?

python -m experiments.sweep --config configs/table4_bits.py --workdir results/table4
python -m experiments.tables --sweep results/table4

NF-k and Int-k bases for k in 2, 3, 4, 8 (double quantization, block 64),
LoRA rank 4 and 16, initialised as usual (B = 0) or with LoftQ (5
alternating quantize / SVD steps, so the adapters start by cancelling the
quantization error), against LoRA over the float base; the main job's
task, one seed. Sized for 2 CPU cores: 3 epochs at 64 tokens, 34 runs,
about 2 hours.
"""

from configs import minilm_docstrings

BITS = (2, 3, 4, 8)
FAMILIES = ("nf", "int")
RANKS = (4, 16)


def get_config():
  c = minilm_docstrings.get_config()
  c.train.epochs = 3
  c.quant.double_quant = True
  c.lora.loftq_iters = 5
  return c


def _adapter(rank: int, loftq: bool) -> dict:
  return {
    "adapter": f"r={rank}" + (" LoftQ" if loftq else ""),
    "lora.rank": rank,
    "lora.alpha": 2.0 * rank,
    "lora.init": "loftq" if loftq else "kaiming",
  }


def get_sweep():
  points = [
    {
      "base": "float",
      "bits": 32,
      "quant.data_type": "none",
      **_adapter(rank, False),
    }
    for rank in RANKS
  ]
  # Fewest bits first: a sweep cut short still answers the question.
  for bits in BITS:
    for family in FAMILIES:
      data_type = f"{family}{bits}"
      for rank in RANKS:
        for loftq in (False, True):
          points.append(
            {
              "base": data_type,
              "bits": bits,
              "quant.data_type": data_type,
              **_adapter(rank, loftq),
            }
          )
  return points


def get_table():
  return {
    "title": "Bit width of the frozen base and LoftQ: eval accuracy (%)",
    "rows": ["base"],
    "columns": "adapter",
    "metrics": [["accuracy", "accuracy (%)", "pct"]],
    "figures": [
      {
        "kind": "xy",
        "file": "accuracy_vs_bits.png",
        "x": "bits",
        "y": "accuracy",
        "series": ["base", "adapter"],
        "series_patterns": {"base": "^[a-z]+"},
        "logx": True,
      }
    ],
  }
