"""The peers' model: a Hugging Face checkpoint loaded by transformers on the
CPU in one of the benchmarks' modes, with PEFT LoRA added.

Needs the optional peers extra (torch, transformers, peft, bitsandbytes).
Modes: `full` (the float32 model, every weight trained), `lora_f32`,
`lora_bf16` (LoRA over a bf16 base) and `qlora_nf4_dq` (bitsandbytes
`BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
bnb_4bit_use_double_quant=True)`, float32 compute as ours on the CPU,
prepared by `peft.prepare_model_for_kbit_training`). LoRA: rank r, alpha
2r, no dropout, on every linear layer but the head. Importing this module
imports torch, transformers and peft: callers import it where they import
the peers extra, before any clock or memory reading starts.
"""

from typing import Any

import peft
import torch
import transformers


def load(
  checkpoint: str,
  mode: str,
  rank: int,
  *,
  gradient_checkpointing: bool = False,
  low_cpu_mem_usage: bool = False,
):
  """The model of `mode` from the folder `checkpoint`, ready to train.

  With `gradient_checkpointing` (as our remat) activations are recomputed
  in the backward pass and the KV cache is off; `low_cpu_mem_usage` is
  passed to `from_pretrained`.
  """
  kwargs: dict[str, Any] = {"dtype": torch.float32}
  if low_cpu_mem_usage:
    kwargs["low_cpu_mem_usage"] = True
  if mode == "lora_bf16":
    kwargs["dtype"] = torch.bfloat16
  if mode == "qlora_nf4_dq":
    kwargs["quantization_config"] = transformers.BitsAndBytesConfig(
      load_in_4bit=True,
      bnb_4bit_quant_type="nf4",
      bnb_4bit_use_double_quant=True,
      bnb_4bit_compute_dtype=torch.float32,
    )
    kwargs["device_map"] = "cpu"
  model = transformers.AutoModelForCausalLM.from_pretrained(
    checkpoint, **kwargs
  )
  if mode != "full":
    if mode == "qlora_nf4_dq":
      model = peft.prepare_model_for_kbit_training(
        model, use_gradient_checkpointing=gradient_checkpointing
      )
    config = peft.LoraConfig(
      r=rank,
      lora_alpha=2 * rank,
      lora_dropout=0.0,
      target_modules="all-linear",
      task_type="CAUSAL_LM",
    )
    model = peft.get_peft_model(model, config)
  if gradient_checkpointing:
    model.gradient_checkpointing_enable()
    model.config.use_cache = False
  return model
