"""Train-step throughput of PEFT + bitsandbytes on the CPU (a peer).

Needs the optional peers extra (torch, transformers, peft, bitsandbytes);
experiments/bench_train.py runs it in its own process next to ours. The
model is the same Hugging Face folder, the same LoRA (rank r, alpha 2r, on
every linear layer but the head), AdamW, random tokens, float32 compute.
"""

import resource
import time
from typing import Any

import numpy as np


def peak_rss_bytes() -> int:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def train_throughput(
  mode: str,
  checkpoint: str,
  *,
  batch: int = 4,
  seq: int = 128,
  rank: int = 16,
  steps_timed: int = 10,
  warmup: int = 3,
  seed: int = 0,
) -> dict[str, Any]:
  import torch  # noqa: PLC0415

  from experiments.peers import peft_model  # noqa: PLC0415

  torch.manual_seed(seed)
  model = peft_model.load(checkpoint, mode, rank)
  model.train()
  params = [p for p in model.parameters() if p.requires_grad]
  opt = torch.optim.AdamW(params, lr=1e-4)
  vocab = model.config.vocab_size
  rng = np.random.default_rng(seed)
  times, losses = [], []
  for i in range(warmup + steps_timed):
    ids = torch.from_numpy(
      rng.integers(1, vocab, (batch, seq + 1), dtype=np.int64)
    )
    t = time.perf_counter()
    out = model(input_ids=ids[:, :-1], labels=ids[:, :-1])
    out.loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    losses.append(float(out.loss))
    if i >= warmup:
      times.append(time.perf_counter() - t)
  step_s = float(np.median(times))
  return {
    "impl": "peft_bnb",
    "mode": mode,
    "tokens_per_s": batch * seq / step_s,
    "step_s": step_s,
    "peak_rss_bytes": peak_rss_bytes(),
    "trainable_params": sum(p.numel() for p in params),
    "first_loss": losses[0],
    "last_loss": losses[-1],
    "torch_threads": torch.get_num_threads(),
  }
