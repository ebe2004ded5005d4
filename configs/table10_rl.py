"""Table 10, "LoRA Without Regret" on a 4-bit base: GRPO with LoRA ranks
1, 4 and 32 over NF4 + DQ, rank 4 over bfloat16, and full fine-tuning.

python -m experiments.sweep --config configs/table10_rl.py --workdir results/table10
python -m experiments.tables --sweep results/table10

Running: results/table10 holds the points finished so far, and the
sweep resumes from there. It checks Thinking Machines' claims (2025) that
for policy-gradient RL LoRA matches full fine-tuning even at rank 1, and that
LoRA's best learning rate is about 10x full fine-tuning's, nearly
independent of rank. SmolLM2-135M-Instruct learns single-digit sums by
GRPO (`qlora_jax.data.arithmetic`: 41 training and 58 held-out
questions, two worked examples in each prompt, disjoint pairs {a, b});
reward 1 for the number alone, 0.5 for the right number among other text,
0.1 for a wrong number. Measured before this table (NF4 + DQ, greedy,
2026-12-07): 8 of 24 single-digit questions exactly right with these
prompts (pass@1 0.33), 0 of 72 with a two-digit operand, which is why
the operands are single digits; at temperature 1, 2 of 8 groups of 8
completions on a mix of both kinds had unequal rewards.

Each point: 8 steps of 4 questions x 4 completions of up to 8 tokens
(32 questions, under one pass over the training set), grpo.mu 1, no KL,
a constant learning rate; held-out pass@1 (greedy) before and after, the
training reward per step as a figure. Learning rates: 3 per row, half a
decade apart, full fine-tuning's centred on 1e-4 (Table 7's, which trains
this model stably) and LoRA's on 1e-3 (the main job's; the blog's 10x), so
the grid can place the ratio of the bests anywhere from 1x to 100x.
LoRA's alpha is 8 at every rank (scale alpha / r, as the blog's fixed
alpha), so rank 4 is the main job's adapter. 5 rows x 3 rates x 3 seeds
= 45 runs, seed-major, so a sweep stopped early has a seed of every row
and rate; it resumes where it stopped.

Sizing: about 45 s per step of 16 completions (from results/grpo_docstrings'
63 s for 16 rows of 146 tokens; these rows are about 103), plus per run
about 25 s of loading, a minute of compiling and two greedy evaluations of
the 58 questions (about 45 s each): about 9 minutes per LoRA run and 12
per full fine-tune, about 7 hours on 2 shared CPU cores (less on idle
ones). Held-out size: at pass@1 near 0.5 the 58 x 3 = 174 answers of a row
give a binomial 95% half-width of 1.96 sqrt(0.25 / 174) = 7.4 points, and
the table's Student t interval over 3 seed means (t = 4.30) is wider
still; the 3-5 points one would want need 300-500 distinct questions, more
than the 99 single-digit sums the model can partly answer.
"""

import pathlib

from configs import default
from qlora_jax.data import arithmetic
from qlora_jax.engine.recipes import overrides

TASKS = pathlib.Path(__file__).resolve().parent.parent / "tasks"
LORA_RATES = (3e-4, 1e-3, 3e-3)
FULL_RATES = (3e-5, 1e-4, 3e-4)
METHODS = {
  "LoRA r=1 NF4+DQ": (
    overrides("qlora_nf4_dq", {"lora.rank": 1}),
    LORA_RATES,
  ),
  "LoRA r=4 NF4+DQ": (overrides("qlora_nf4_dq"), LORA_RATES),
  "LoRA r=32 NF4+DQ": (
    overrides("qlora_nf4_dq", {"lora.rank": 32}),
    LORA_RATES,
  ),
  "LoRA r=4 bf16": (overrides("lora_bf16"), LORA_RATES),
  "Full fine-tune": (overrides("full"), FULL_RATES),
}
SEEDS = (0, 1, 2)


def get_config():
  c = default.get_config()
  c.train.objective = "grpo"
  c.data.source = "jsonl"
  c.data.train_path = str(TASKS / arithmetic.FILES[0])
  c.data.eval_path = str(TASKS / arithmetic.FILES[1])
  c.data.eval_generate = 0  # GRPO answers every eval question for pass@1
  c.data.max_length = 128  # prompts of about 95 tokens and 8 new ones
  c.eval.tasks = ()
  c.lora.alpha = 8.0  # the same at every rank: scale alpha / r
  c.grpo.group_size = 4
  c.grpo.temperature = 1.0
  c.grpo.max_new_tokens = 8  # "6 + 6 = 12" and the end of the turn
  c.grpo.reward = "qlora_jax.data.arithmetic:reward"
  c.grpo.pass_reward = arithmetic.EXACT  # pass@1: the number alone
  c.grpo.beta = 0.0
  c.train.batch_size = 4  # questions per step: 16 completions
  c.train.epochs = 0
  c.train.steps = 8
  c.train.eval_every = 8  # before training and at the end
  c.train.log_every = 1  # the reward curve
  c.train.show_predictions = 0
  c.opt.schedule = "constant"
  c.opt.warmup_ratio = 0.0
  return c


def get_sweep():
  # Seed-major: a sweep stopped early still has a seed of every row.
  return [
    {"method": name, **o, "opt.learning_rate": lr, "train.seed": seed}
    for seed in SEEDS
    for name, (o, rates) in METHODS.items()
    for lr in rates
  ]


def get_table():
  return {
    "title": "GRPO on single-digit sums, SmolLM2-135M-Instruct",
    "rows": ["method", "opt.learning_rate"],
    "metrics": [
      ["pass@1", "pass@1 (%)", "pct"],
      ["zero_shot_pass@1", "zero-shot pass@1 (%)", "pct"],
      ["reward", "held-out reward", "f3"],
      ["trainable_params", "trainable", "int"],
      ["train_step_memory_bytes", "step memory (MiB)", "mib"],
      ["step_seconds_median", "step (s)", "f3"],
    ],
    "best": {
      "over": "opt.learning_rate",
      "metric": ["pass@1", "pass@1 (%)", "pct"],
      "reference": "Full fine-tune",
    },
    "figures": [
      {
        "kind": "curves",
        "file": "reward.png",
        "metric": "reward",
        "records": "train",
      }
    ],
  }
