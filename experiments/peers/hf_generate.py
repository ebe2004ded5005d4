"""Greedy decoding speed of transformers (float, and bitsandbytes 4-bit) on
the CPU: the peer of qlora_jax.bench.generate.

Needs the peers extra. The model is the Hugging Face folder that
experiments.convert writes from the same GGUF file; prompts are the same
token ids. `min_new_tokens` keeps every row generating `new_tokens`.
"""

import resource
import statistics
import time
from typing import Any

import numpy as np


def decode_speed(
  folder: str,
  quantized: bool,
  ids: np.ndarray,
  new_tokens: int,
  repeats: int = 3,
) -> dict[str, Any]:
  import torch  # noqa: PLC0415
  import transformers  # noqa: PLC0415

  kwargs: dict[str, Any] = {"dtype": torch.float32}
  if quantized:
    kwargs["quantization_config"] = transformers.BitsAndBytesConfig(
      load_in_4bit=True,
      bnb_4bit_quant_type="nf4",
      bnb_4bit_use_double_quant=True,
      bnb_4bit_compute_dtype=torch.float32,
    )
    kwargs["device_map"] = "cpu"
  model = transformers.AutoModelForCausalLM.from_pretrained(folder, **kwargs)
  model.eval()
  x = torch.from_numpy(ids.astype(np.int64))
  mask = torch.ones_like(x)

  def run(n):
    with torch.no_grad():
      return model.generate(
        input_ids=x,
        attention_mask=mask,
        max_new_tokens=n,
        min_new_tokens=n,
        do_sample=False,
        pad_token_id=2,
      )

  def median(n):
    times = []
    for _ in range(repeats):
      t0 = time.perf_counter()
      run(n)
      times.append(time.perf_counter() - t0)
    return statistics.median(times)

  run(2)  # warm-up
  first = median(1)
  total = median(new_tokens)
  batch = ids.shape[0]
  return {
    "impl": "transformers" + (" + bitsandbytes" if quantized else ""),
    "quantized": quantized,
    "batch": batch,
    "prompt_len": ids.shape[1],
    "new_tokens": new_tokens,
    "time_to_first_token_s": first,
    "total_s": total,
    "decode_tokens_per_s": batch * (new_tokens - 1) / max(total - first, 1e-9),
    "tokens_per_s": batch * new_tokens / total,
    "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    "first_tokens": run(8)[0, ids.shape[1] :].tolist(),
  }
