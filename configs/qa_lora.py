"""The main job with QA-LoRA over SmolLM2's own Q4_1 weights.

python -m experiments.train --config configs/qa_lora.py --workdir runs/qa
python -m experiments.export --workdir runs/qa --gguf runs/qa/merged.gguf

As configs/default.py, but the base is int4_asym in blocks of 32 (GGML's
Q4_1, the format the SmolLM2 GGUF ships in: its codes are taken as stored,
no requantization) and the adapters are QA-LoRA (A over block means, [in /
32, r]), whose merge changes block minimums only: the exported GGUF is Q4_1
again with the trained model's codes, the adapters folded in.
"""

from configs import default


def get_config():
  c = default.get_config()
  c.quant.data_type = "int4_asym"
  c.quant.block_size = 32
  c.quant.double_quant = False  # Q4_1 stores float16 d and m per block
  c.lora.qa = True
  c.eval.tasks = ()  # its committed results ran without lm-eval tasks
  return c
