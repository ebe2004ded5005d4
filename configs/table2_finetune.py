"""Table 2, fine-tuning methods (the QLoRA paper's GLUE / T5 table).

python -m experiments.sweep --config configs/table2_finetune.py --workdir results/table2
python -m experiments.tables --sweep results/table2

Full fine-tuning, LoRA over an f32 and a bf16 base, and QLoRA with Int8,
FP4, NF4 and NF4 + double quantization bases, on the main job's task (the
real MiniLM-L6 classifying stdlib docstrings into 8 packages), 3 seeds
each: accuracy (mean and 95% interval), trainable parameters, compiled
memory of the train step and its median time. Sized for 2 CPU cores: 3
epochs of 1,360 examples at 64 tokens, 21 runs, about 1.5 hours. On a
GPU/TPU add
--config.model.dtype=bfloat16 and point model.checkpoint / data.* at a real
model and task (see the README).
"""

from configs import minilm_docstrings
from qlora_jax.engine.recipes import overrides

METHODS = {
  "Full fine-tune": overrides("full", {"opt.learning_rate": 1e-4}),
  "LoRA f32": overrides("lora_f32"),
  # Computes in bfloat16 too (the modes' LoRA bf16 stores the base only).
  "LoRA bf16": overrides("lora_bf16", {"model.dtype": "bfloat16"}),
  "QLoRA Int8": {"quant.data_type": "int8", "quant.double_quant": False},
  "QLoRA FP4": {"quant.data_type": "fp4", "quant.double_quant": False},
  "QLoRA NF4": {"quant.data_type": "nf4", "quant.double_quant": False},
  "QLoRA NF4+DQ": overrides("qlora_nf4_dq"),
}
SEEDS = (0, 1, 2)


def get_config():
  c = minilm_docstrings.get_config()
  c.train.epochs = 3
  return c


def get_sweep():
  # Seed-major: a sweep stopped early still has a seed of every method.
  return [
    {"method": name, **overrides, "train.seed": seed}
    for seed in SEEDS
    for name, overrides in METHODS.items()
  ]


def get_table():
  return {
    "title": "Fine-tuning MiniLM-L6 on stdlib docstrings (8 classes)",
    "rows": ["method"],
    "metrics": [
      ["accuracy", "accuracy (%)", "pct"],
      ["trainable_params", "trainable", "int"],
      ["linear_bytes_stored", "linear weights (MiB)", "mib"],
      ["train_step_memory_bytes", "step memory (MiB)", "mib"],
      ["step_seconds_median", "step (s)", "f3"],
    ],
    "figures": [{"kind": "curves", "file": "eval_loss.png", "metric": "loss"}],
  }
