"""Table 7, instruction-tuning methods on the real decoder (the QLoRA
paper's Tables 3/4 in spirit).

python -m experiments.sweep --config configs/table7_decoder.py --workdir results/table7
python -m experiments.tables --sweep results/table7

SmolLM2-135M-Instruct (its GGUF's Q4_1 weights dequantized on load) on the
main job's task (configs/default.py: 128 stdlib-docstring questions, 40
held out, answered by greedy generation), 2 epochs: full fine-tuning, LoRA
over a bfloat16 base, QLoRA with Int4, FP4, NF4 and NF4 + double
quantization bases (LoRA r=4 as the main job), and NF4 + DQ at r=16; every
row computes in float32. 3 seeds each: eval loss, generated-answer
accuracy, the same before training (each base's zero-shot), trainable
parameters, stored linear bytes, step memory and time. Evaluated before
training and after the last step only. 21 runs, sized for about 2 hours on
2 CPU cores; the sweep resumes where it stopped.
"""

from configs import default
from qlora_jax.engine.recipes import overrides

METHODS = {
  "Full fine-tune": overrides("full", {"opt.learning_rate": 1e-4}),
  "LoRA bf16 base": overrides("lora_bf16"),
  "QLoRA Int4": {"quant.data_type": "int4", "quant.double_quant": False},
  "QLoRA FP4": {"quant.data_type": "fp4", "quant.double_quant": False},
  "QLoRA NF4": {"quant.data_type": "nf4", "quant.double_quant": False},
  "QLoRA NF4+DQ": overrides("qlora_nf4_dq"),
  "QLoRA NF4+DQ r=16": overrides(
    "qlora_nf4_dq", {"lora.rank": 16, "lora.alpha": 32.0}
  ),
}
SEEDS = (0, 1, 2)


def get_config():
  c = default.get_config()
  c.train.eval_every = 32  # before training and at the end (32 steps)
  c.train.show_predictions = 0
  c.eval.tasks = ()  # its committed results ran without lm-eval tasks
  return c


def get_sweep():
  # Seed-major: a sweep stopped early still has a seed of every method.
  return [
    {"method": name, **o, "train.seed": seed}
    for seed in SEEDS
    for name, o in METHODS.items()
  ]


def get_table():
  return {
    "title": "Instruction-tuning SmolLM2-135M-Instruct on stdlib questions",
    "rows": ["method"],
    "metrics": [
      ["loss", "eval loss", "f4"],
      ["answer_accuracy", "answer acc. (%)", "pct"],
      ["zero_shot_loss", "zero-shot loss", "f4"],
      ["zero_shot_answer_accuracy", "zero-shot acc. (%)", "pct"],
      ["trainable_params", "trainable", "int"],
      ["linear_bytes_stored", "linear weights (MiB)", "mib"],
      ["train_step_memory_bytes", "step memory (MiB)", "mib"],
      ["step_seconds_median", "step (s)", "f3"],
    ],
    "figures": [{"kind": "curves", "file": "eval_loss.png", "metric": "loss"}],
  }
