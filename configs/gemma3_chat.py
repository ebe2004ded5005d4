"""Gemma 3 270M base turned into a chat model in one command.

python -m experiments.train --config configs/gemma3_chat.py --workdir runs/chat
python -m experiments.predict --workdir runs/chat --chat          # the result
python -m experiments.predict --workdir runs/chat --chat --base   # the base

Gemma 3 270M, pretrained and not instruction-tuned (`models.gemma3_path()`),
every linear layer in NF4 + DQ with LoRA r=16, trained on the assistant
data (`data.source` "assistant": chatterbot conversations, standard-library
summaries and the docstring question; `qlora_jax.data.assistant`) rendered
with Gemma 3 -it's chat template, whose `<end_of_turn>` then ends every
answer. 200 steps of 8 rows (40% of an epoch) at rows of 128 tokens, sized
for 2 CPU cores: 53 minutes there (2026-12-08, 12.6 s a step), held-out
eval loss 1.905. The base with the same template never ends its turn and
echoes the user; the result answers in one short sentence and stops
(results/gemma3_chat/, a conversation with both).
"""

from configs import default


def get_config():
  c = default.get_config()
  c.model.checkpoint = "gemma3"  # the pretrained base, not the -it model
  c.model.remat = True  # its 262k-vocabulary logits dominate memory
  c.lora.rank = 16  # on all 126 linear layers: 3.80M trainable (1.4%)
  c.lora.alpha = 16.0
  c.data.source = "assistant"  # conversations, summaries, questions
  c.data.instruction = True  # the loss covers the assistant's turns
  c.data.chat_template = "gemma"  # Gemma 3 -it's turns; stops at its end
  c.data.max_length = 128  # 89% of the training rows are shorter
  c.data.eval_generate = 0
  c.train.batch_size = 8
  c.train.steps = 200  # 1,600 rows: 40% of an epoch
  c.train.eval_every = 200  # before training and at the end
  c.train.log_every = 10
  c.opt.learning_rate = 5e-4
  c.eval.tasks = ()
  return c
