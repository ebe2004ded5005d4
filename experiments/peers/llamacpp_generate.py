"""Greedy decoding speed of llama.cpp (llama-cpp-python's C API) on a
GGUF file: the peer of qlora_jax.bench.generate.

Needs `llama-cpp-python`. The rows decode as llama.cpp serves parallel
requests: one sequence id per row in a shared batch, the prompt tokens of
every row in one `llama_decode`, then one token per row per call. Tokens
are the argmax of each row's logits (read by NumPy, as a greedy sampler
reads them); no end token stops a row.
"""

import os
import resource
import statistics
import time
from typing import Any

import numpy as np


def decode_speed(
  gguf: str,
  ids: np.ndarray,
  new_tokens: int,
  repeats: int = 3,
  threads: int | None = None,
) -> dict[str, Any]:
  import llama_cpp  # noqa: PLC0415

  threads = threads or os.cpu_count()
  rows, prompt = ids.shape
  llama_cpp.llama_backend_init()
  params = llama_cpp.llama_model_default_params()
  model = llama_cpp.llama_model_load_from_file(gguf.encode(), params)
  if not model:
    raise RuntimeError(f"llama.cpp could not load {gguf}")
  per_row = -(-(prompt + new_tokens) // 256) * 256
  cp = llama_cpp.llama_context_default_params()
  cp.n_ctx = rows * per_row
  cp.n_batch = cp.n_ubatch = max(rows * prompt, 512)
  cp.n_seq_max = rows
  cp.n_threads = cp.n_threads_batch = threads
  ctx = llama_cpp.llama_init_from_model(model, cp)
  vocab = llama_cpp.llama_model_get_vocab(model)
  n_vocab = llama_cpp.llama_vocab_n_tokens(vocab)
  batch = llama_cpp.llama_batch_init(max(rows * prompt, rows), 0, rows)

  def decode(entries):
    for i, (token, pos, seq, logits) in enumerate(entries):
      batch.token[i] = token
      batch.pos[i] = pos
      batch.n_seq_id[i] = 1
      batch.seq_id[i][0] = seq
      batch.logits[i] = logits
    batch.n_tokens = len(entries)
    code = llama_cpp.llama_decode(ctx, batch)
    if code != 0:
      raise RuntimeError(f"llama_decode returned {code}")

  def argmax(i: int) -> int:
    logits = llama_cpp.llama_get_logits_ith(ctx, i)
    return int(np.ctypeslib.as_array(logits, shape=(n_vocab,)).argmax())

  def run(n: int) -> list[list[int]]:
    llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(ctx), True)
    decode(
      [
        (int(ids[s, j]), j, s, j == prompt - 1)
        for s in range(rows)
        for j in range(prompt)
      ]
    )
    out = [[argmax(s * prompt + prompt - 1)] for s in range(rows)]
    for step in range(1, n):
      decode([(out[s][-1], prompt + step - 1, s, True) for s in range(rows)])
      for s in range(rows):
        out[s].append(argmax(s))
    return out

  def median(n: int) -> float:
    times = []
    for _ in range(repeats):
      t0 = time.perf_counter()
      run(n)
      times.append(time.perf_counter() - t0)
    return statistics.median(times)

  run(2)  # warm-up
  first = median(1)
  total = median(new_tokens)
  decode_tps = rows * (new_tokens - 1) / max(total - first, 1e-9)
  first_tokens = run(8)[0]
  llama_cpp.llama_batch_free(batch)
  llama_cpp.llama_free(ctx)
  llama_cpp.llama_model_free(model)
  return {
    "impl": "llama.cpp",
    "batch": rows,
    "prompt_len": prompt,
    "new_tokens": new_tokens,
    "threads": threads,
    "time_to_first_token_s": first,
    "total_s": total,
    "decode_tokens_per_s": decode_tps,
    "tokens_per_s": rows * new_tokens / total,
    "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    "first_tokens": first_tokens,
  }
