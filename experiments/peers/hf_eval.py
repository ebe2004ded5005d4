"""lm-eval's Hugging Face backend (`HFLM`) on the CPU, float32 or
bitsandbytes NF4 + DQ: the peer of qlora_jax.bench.evaluate.

Needs the peers extra and lm-eval. The model is the Hugging Face folder
that experiments.convert writes from the same GGUF file.
"""

from typing import Any

from qlora_jax.bench import evaluate


def eval_speed(
  folder: str,
  quantized: bool,
  task: str,
  include_path: str,
  batch_size: int,
  **kwargs,
) -> dict[str, Any]:
  import torch  # noqa: PLC0415
  import transformers  # noqa: PLC0415
  from lm_eval.models.huggingface import HFLM  # noqa: PLC0415

  load: dict[str, Any] = {"dtype": torch.float32}
  if quantized:
    load["quantization_config"] = transformers.BitsAndBytesConfig(
      load_in_4bit=True,
      bnb_4bit_quant_type="nf4",
      bnb_4bit_use_double_quant=True,
      bnb_4bit_compute_dtype=torch.float32,
    )
    load["device_map"] = "cpu"
  model = transformers.AutoModelForCausalLM.from_pretrained(folder, **load)
  model.eval()
  tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
  lm = HFLM(
    pretrained=model, tokenizer=tokenizer, device="cpu", batch_size=batch_size
  )
  result = evaluate.timed_runs(lm, task, include_path, **kwargs)
  return {"impl": "lm-eval HFLM", "quantized": quantized, **result}
