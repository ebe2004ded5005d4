"""Table 5, cost at the seed's scale: a ~100M-parameter Llama-shaped model.

python -m experiments.sweep --config configs/table5_cost.py --workdir results/table5
python -m experiments.tables --sweep results/table5

A randomly initialised Llama (hidden 768, 10 layers, 12 heads, MLP 2048,
vocab 32,000, tied embeddings: 95M parameters) trained for a few steps on
random tokens (batch 4 x 128) by full fine-tuning, LoRA (r=8 on every
linear layer) over an f32 and a bf16 base, and QLoRA NF4 + double
quantization: total and trainable parameters, bytes of the frozen linear
weights and of the whole base, XLA's compiled memory of the train step and
its median time. On 2 CPU cores: about 10 minutes. With real models the
same measurement comes from any run's final_metrics.json.
"""

from configs import base
from qlora_jax.engine.recipes import overrides

METHODS = {
  "Full fine-tune f32": overrides("full"),
  "LoRA f32 base": overrides("lora_f32"),
  "LoRA bf16 base": overrides("lora_bf16"),
  "QLoRA NF4+DQ": overrides("qlora_nf4_dq"),
}


def get_config():
  c = base.get_config()
  c.model.checkpoint = ""
  c.model.task = "causal_lm"
  c.model.scan_layers = True
  c.model.hf_config = {
    "model_type": "llama",
    "vocab_size": 32000,
    "hidden_size": 768,
    "intermediate_size": 2048,
    "num_hidden_layers": 10,
    "num_attention_heads": 12,
    "num_key_value_heads": 12,
    "max_position_embeddings": 512,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "tie_word_embeddings": True,
  }
  c.data.source = "synthetic"
  c.data.max_length = 128
  c.data.synthetic_examples = 32
  c.data.synthetic_eval_examples = 4
  c.lora.dropout = 0.0
  c.train.batch_size = 4
  c.train.steps = 6
  c.train.eval_every = 6
  c.train.log_every = 1
  c.opt.warmup_ratio = 0.0
  return c


def get_sweep():
  return [{"method": name, **o} for name, o in METHODS.items()]


def get_table():
  return {
    "title": "Cost of a 95M-parameter Llama: full fine-tune, LoRA, QLoRA",
    "rows": ["method"],
    "metrics": [
      ["base_params", "parameters", "int"],
      ["trainable_params", "trainable", "int"],
      ["trainable_fraction", "trainable (%)", "pct"],
      ["linear_bytes_stored", "linear weights (MiB)", "mib"],
      ["base_bytes_stored", "whole base (MiB)", "mib"],
      ["train_step_memory_bytes", "step memory (MiB)", "mib"],
      ["step_seconds_median", "step (s)", "f3"],
    ],
  }
