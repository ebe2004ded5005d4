"""GRPO of SmolLM2-135M-Instruct in 4 bits on the main job's question.

python -m experiments.train --config configs/grpo_docstrings.py \
  --workdir runs/grpo_docstrings

The main job's model and adapters (NF4 + DQ, LoRA r=4 on all 210 linear
layers) trained with `train.objective` "grpo" on its docstring question
(data.source "stdlib_questions": 128 training and 40 held-out questions,
"Which Python standard-library package is this docstring from? Answer
with one word: ..."). Each step samples 4 completions of up to 24 tokens
for each of 4 questions; `reward` gives 1 for a completion that names
the right package anywhere and 2 for one that is that single word (up to
case, whitespace and a final full stop); held-out pass@1 is the share of
greedy answers that are that word (reward 2, as the main job's answer
accuracy). On 2 CPU cores shared with other jobs (AMD EPYC, 2026-12-07,
18 min 40 s wall): held-out reward 0.125 -> 0.150 and pass@1 0.000 ->
0.000 after 8 steps; 2 of the 128 sampled completions named the package,
so nearly every group had no signal (results/grpo_docstrings/).
"""

import re

from configs import default


def reward(prompt: str, completion: str, row: dict) -> float:
  """2 for the package asked for as the single word, 1 for a completion
  naming it anywhere, else 0."""
  del prompt
  package = row["completion"]
  if completion.strip().rstrip(".").strip().lower() == package.lower():
    return 2.0
  named = re.search(rf"\b{re.escape(package)}\b", completion, re.IGNORECASE)
  return float(named is not None)


def get_config():
  c = default.get_config()
  c.train.objective = "grpo"
  c.data.eval_generate = 0  # GRPO answers every eval question for pass@1
  c.eval.tasks = ()
  # Room for the longest question (191 tokens, held out) and 24 new
  # tokens; training rows are as long as the longest training question
  # (123) + 23.
  c.data.max_length = 214
  c.grpo.group_size = 4
  c.grpo.temperature = 1.0
  # Up to 12 tokens no sampled answer named the package (128 of 128 in 8
  # steps): the model's answers are sentences that name it late, if ever.
  c.grpo.max_new_tokens = 24
  c.grpo.reward = "configs.grpo_docstrings:reward"
  c.grpo.answer_field = "completion"  # the package, for `reward`
  c.grpo.pass_reward = 2.0  # pass@1: the single word asked for
  c.grpo.beta = 0.0
  c.train.batch_size = 4  # questions per step: 16 completions
  c.train.epochs = 0
  c.train.steps = 8  # 32 of the 128 training questions
  c.train.eval_every = 8
  c.train.log_every = 1
  c.opt.learning_rate = 2e-3
  return c
