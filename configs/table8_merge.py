"""Table 8, what merging costs: QLoRA NF4 + DQ vs QA-LoRA over Q4_1.

python -m experiments.merge_table --workdir results/table8 [--seeds 0,1,2]

The main job (configs/default.py: SmolLM2-135M-Instruct, LoRA r=4 on all
210 linear layers, the stdlib docstring questions, 2 epochs) trained twice
per seed: over NF4 + double quantization (QLoRA) and over int4_asym in
blocks of 32, SmolLM2's own Q4_1, with QA-LoRA adapters
(`ablations.merging.RUNS`); each then evaluated as trained, merged, and
exported (`ablations.merging.ROWS`). On 2 CPU cores about 20 minutes per
seed.
"""

from configs import default

SEEDS = (0, 1, 2)


def get_config():
  c = default.get_config()
  c.eval.tasks = ()  # its committed results ran without lm-eval tasks
  return c
