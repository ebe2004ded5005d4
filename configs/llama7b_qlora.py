"""QLoRA on the Llama-2 7B shape: the memory model's and bench_scale's run.

python -m experiments.memory --config configs/llama7b_qlora.py --lower cuda,tpu
python -m experiments.memory --config configs/llama7b_qlora.py --platform tpu \
  --devices 8 --device_memory 16GiB --config.mesh.fsdp=8 --config.train.batch_size=8

The shape of Llama-2 7B (hidden 4096, 32 layers, 32 heads, MLP 11008,
vocabulary 32,000, untied head) with random weights unless
`model.checkpoint` names a folder; every linear layer in NF4 + double
quantization (block 64), LoRA r=16 on all of them, scanned and
rematerialised layers, bfloat16 compute, batch 1 x 256 tokens.
"""

from configs import base
from qlora_jax.bench import families


def get_config():
  c = base.get_config()
  c.model.checkpoint = ""  # or a Hugging Face folder of this shape
  c.model.hf_config = families.family_config_dict("7b")
  c.model.task = "causal_lm"
  c.model.scan_layers = True
  c.model.remat = True
  c.model.dtype = "bfloat16"
  c.lora.rank = 16
  c.lora.alpha = 32.0
  c.lora.dropout = 0.0
  c.data.source = "synthetic"
  c.data.max_length = 256
  c.train.batch_size = 1
  c.train.steps = 3
  return c
