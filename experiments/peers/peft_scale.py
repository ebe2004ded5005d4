"""PEFT + bitsandbytes loading and training a large checkpoint from disk (a
peer of `qlora_jax.bench.scale.train_from_disk`).

Needs the optional peers extra. transformers `from_pretrained` on the CPU
(QLoRA: `BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
bnb_4bit_use_double_quant=True)`, float32 compute as ours on the CPU; LoRA
over a bf16 base: the base in bf16), PEFT LoRA r=16 on every linear layer
but the head, gradient checkpointing (as our remat), AdamW, batch 1 x 256
random tokens. Peak RSS of loading and of training are measured apart
(VmHWM, reset in between), as ours are.
"""

import time
from typing import Any

import numpy as np


class _Rss:
  """VmRSS / VmHWM of this process (no jax import in the peer's process)."""

  @staticmethod
  def _status(field: str) -> int:
    with open("/proc/self/status") as f:
      for line in f:
        if line.startswith(field + ":"):
          return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")

  def current_rss_bytes(self) -> int:
    return self._status("VmRSS")

  def window_peak_rss_bytes(self) -> int:
    return self._status("VmHWM")

  @staticmethod
  def reset_peak_rss() -> None:
    with open("/proc/self/clear_refs", "w") as f:
      f.write("5")


profiling = _Rss()


def train_from_disk(
  folder: str,
  mode: str,
  *,
  batch: int = 1,
  seq: int = 256,
  rank: int = 16,
  steps_run: int = 3,
  seed: int = 0,
) -> dict[str, Any]:
  import torch  # noqa: PLC0415

  from experiments.peers import peft_model  # noqa: PLC0415

  torch.manual_seed(seed)
  base_rss = profiling.current_rss_bytes()
  profiling.reset_peak_rss()
  t0 = time.perf_counter()
  model = peft_model.load(
    folder, mode, rank, gradient_checkpointing=True, low_cpu_mem_usage=True
  )
  load_s = time.perf_counter() - t0
  load_peak = profiling.window_peak_rss_bytes()
  profiling.reset_peak_rss()
  model.train()
  params = [p for p in model.parameters() if p.requires_grad]
  opt = torch.optim.AdamW(params, lr=1e-4)
  vocab = model.config.vocab_size
  rng = np.random.default_rng(seed)
  times, losses = [], []
  for _ in range(steps_run):
    ids = torch.from_numpy(rng.integers(1, vocab, (batch, seq + 1)))
    t = time.perf_counter()
    out = model(input_ids=ids[:, :-1], labels=ids[:, :-1])
    out.loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    losses.append(float(out.loss))
    times.append(time.perf_counter() - t)
  step_s = float(np.median(times[1:] if len(times) > 1 else times))
  return {
    "impl": "peft_bnb",
    "mode": mode,
    "params": sum(p.numel() for p in model.parameters()),
    "trainable_params": sum(p.numel() for p in params),
    "load_s": load_s,
    "runtime_rss_bytes": base_rss,
    "load_peak_rss_bytes": load_peak,
    "train_peak_rss_bytes": profiling.window_peak_rss_bytes(),
    "step_s": step_s,
    "step_times_s": times,
    "tokens_per_s": batch * seq / step_s,
    "losses": losses,
    "finite": bool(np.all(np.isfinite(losses))),
    "torch_threads": torch.get_num_threads(),
  }
