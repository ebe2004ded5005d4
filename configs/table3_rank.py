"""Table 3, LoRA rank and targets (the LoRA paper's rank table), QLoRA.

python -m experiments.sweep --config configs/table3_rank.py --workdir results/table3
python -m experiments.tables --sweep results/table3

QLoRA NF4 + double quantization on the main job's task, r in 1, 2, 4, 8,
16, 64 with adapters on {query, value} only or on all linear layers,
alpha = 2r (a constant scale, so the learning rate needs no retuning
across ranks), 2 seeds: eval accuracy. Sized for 2 CPU cores: 3 epochs at
64 tokens, 24 runs, about 1.5 hours.
"""

from configs import minilm_docstrings

RANKS = (1, 2, 4, 8, 16, 64)
TARGETS = {"q,v": ["query", "value"], "all linear": "all-linear"}
SEEDS = (0, 1)


def get_config():
  c = minilm_docstrings.get_config()
  c.train.epochs = 3
  c.quant.data_type = "nf4"
  c.quant.double_quant = True
  return c


def get_sweep():
  return [
    {
      "targets": name,
      "lora.targets": targets,
      "lora.rank": rank,
      "lora.alpha": 2.0 * rank,
      "train.seed": seed,
    }
    # Seed-major: a sweep stopped early has a seed of every point.
    for seed in SEEDS
    for name, targets in TARGETS.items()
    for rank in RANKS
  ]


def get_table():
  return {
    "title": "LoRA rank and targets, QLoRA NF4+DQ: eval accuracy (%)",
    "rows": ["lora.rank"],
    "columns": "targets",
    "metrics": [["accuracy", "accuracy (%)", "pct"]],
    "figures": [
      {
        "kind": "xy",
        "file": "accuracy_vs_rank.png",
        "x": "lora.rank",
        "y": "accuracy",
        "series": "targets",
        "logx": True,
      }
    ],
  }
