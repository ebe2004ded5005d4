"""Greedy decoding speed of this codebase (experiments.bench_generate).

One call measures one model in the current process: time to first token
(the prompt's forward pass and the first token), and decode tokens per
second over the rest, with the KV cache, every call blocked on. Prompts
are real text (standard-library docstrings) cut to `prompt_len` tokens;
no end token stops a row, so every row generates `new_tokens` tokens.
"""

import pathlib
import statistics
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from qlora_jax import data, models, nn, quant
from qlora_jax.engine import profiling, setup

NF4_DQ = {"data_type": "nf4", "block_size": 64, "double_quant": True}
# The linear weights of a run: float (a GGUF's blocks dequantized), NF4 +
# DQ, or a Q4_1 GGUF's codes and scales kept as stored (int4_asym, blocks
# of 32: llama.cpp's own weights).
WEIGHTS = {
  "float": None,
  "nf4": NF4_DQ,
  "q4_1": {"data_type": "int4_asym", "block_size": 32, "double_quant": False},
}


def prompt_ids(tokenizer, batch: int, prompt_len: int, folder) -> np.ndarray:
  """[batch, prompt_len] token ids of held-out docstrings (the main job's
  eval split), each cut to `prompt_len` tokens."""
  _, eval_path = data.write_stdlib_docstrings(pathlib.Path(folder))
  texts = [e.text for e in data.read_classification_jsonl(eval_path)]
  rows = []
  for text in texts:
    ids = tokenizer.encode_batch([text], add_special_tokens=False)[0]
    while len(ids) < prompt_len:
      ids = ids + ids
    rows.append(ids[:prompt_len])
    if len(rows) == batch:
      break
  return np.asarray(rows, np.int32)


def _median_seconds(fn, repeats: int) -> float:
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


def decode_speed(
  checkpoint: str,
  weights: str,
  batch: int,
  prompt_len: int,
  new_tokens: int,
  folder,
  repeats: int = 3,
) -> dict[str, Any]:
  """Time to first token and decode tokens/s of greedy generation."""
  path = setup.resolve_checkpoint(checkpoint)
  lm = models.from_pretrained(path, quant=WEIGHTS[weights])
  tok = setup.load_tokenizer(path)
  return _decode_speed(
    lm, tok, weights, batch, prompt_len, new_tokens, folder, repeats
  )


def _decode_speed(
  lm, tok, weights, batch, prompt_len, new_tokens, folder, repeats
) -> dict[str, Any]:
  ids = prompt_ids(tok, batch, prompt_len, folder)
  mask = np.ones_like(ids)

  def run(n):
    return models.generate(
      lm.model,
      lm.variables,
      ids,
      mask,
      max_new_tokens=n,
      eos_token_id=(),
      pad_token_id=tok.pad_id,
    )

  t0 = time.perf_counter()
  jax.block_until_ready(run(1))
  jax.block_until_ready(run(new_tokens))
  compile_s = time.perf_counter() - t0
  first = _median_seconds(lambda: run(1), repeats)
  total = _median_seconds(lambda: run(new_tokens), repeats)
  decode = batch * (new_tokens - 1) / max(total - first, 1e-9)
  return {
    "impl": "qlora_jax",
    "weights": weights,
    "batch": batch,
    "prompt_len": prompt_len,
    "new_tokens": new_tokens,
    "time_to_first_token_s": first,
    "total_s": total,
    "decode_tokens_per_s": decode,
    "tokens_per_s": batch * new_tokens / total,
    "compile_s": compile_s,
    "peak_rss_bytes": profiling.peak_rss_bytes(),
    "first_tokens": np.asarray(run(8))[0].tolist(),
  }


def _linear_weights(variables) -> list:
  """The frozen weights of a decoder's linear layers (QuantizedTensor or
  float [out, in]), the embedding table and the output head left out."""
  leaves = jax.tree_util.tree_leaves_with_path(
    variables.get("base", {}),
    is_leaf=lambda x: isinstance(x, quant.QuantizedTensor),
  )
  return [
    w
    for path, w in leaves
    if jax.tree_util.keystr(path).endswith("['weight']")
    and "lm_head" not in jax.tree_util.keystr(path)
    and (isinstance(w, quant.QuantizedTensor) or w.ndim == 2)
  ]


def _loop_seconds(fn, steps: int, repeats: int) -> float:
  """Median seconds of one iteration of `fn(carry) -> carry` (float32
  scalar), run `steps` times in one compiled loop: the calls of a decoding
  step without its dispatch."""
  loop = jax.jit(lambda c: jax.lax.fori_loop(0, steps, lambda _, v: fn(v), c))
  jax.block_until_ready(loop(jnp.float32(0)))
  return _median_seconds(lambda: loop(jnp.float32(0)), repeats) / steps


def decode_parts(
  checkpoint: str,
  weights: str,
  prompt_len: int,
  new_tokens: int,
  folder,
  repeats: int = 3,
) -> dict[str, Any]:
  """Where a batch-1 greedy decoding step goes: milliseconds per token of
  the whole step (`decode_speed`), of the linear layers' matmuls alone and
  of the output head alone. Each part runs the calls the step makes (the
  same weights, kernel and head, one token), chained so that each waits
  for the last as in the model, in one compiled loop of `new_tokens`
  iterations; the rest of the step (attention over the cache, norms,
  rotary embeddings, token selection, the loop) is the difference."""
  path = setup.resolve_checkpoint(checkpoint)
  lm = models.from_pretrained(path, quant=WEIGHTS[weights])
  tok = setup.load_tokenizer(path)
  step = _decode_speed(
    lm, tok, weights, 1, prompt_len, new_tokens, folder, repeats
  )
  linears = _linear_weights(lm.variables)
  hidden = lm.config.hidden_size

  def body_linears(carry):
    for w in linears:
      x = jnp.full((1, 1, w.shape[1]), 1e-3, jnp.float32) + carry * 1e-30
      carry = carry + nn.frozen_matmul(x, w, jnp.float32)[0, 0, 0]
    return carry

  q8_head = models.decode_head("auto", lm.model, lm.variables)

  def body_head(carry):
    x = jnp.full((1, 1, hidden), 1e-3, jnp.float32) + carry * 1e-30
    logits = lm.model.apply(lm.variables, None, hidden=x, decode_head=q8_head)
    return carry + logits[0, 0, 0]

  steps = new_tokens - 1
  per_token = 1.0 / step["decode_tokens_per_s"]
  matmuls = _loop_seconds(body_linears, steps, repeats)
  head = _loop_seconds(body_head, steps, repeats)
  weight_bytes = sum(
    sum(x.nbytes for x in jax.tree_util.tree_leaves(w)) for w in linears
  )
  return {
    "impl": "qlora_jax",
    "weights": weights,
    "linear_layers": len(linears),
    "linear_weight_bytes": weight_bytes,
    "head": "q8_0" if q8_head is not None else "float",
    "step_ms": per_token * 1e3,
    "matmuls_ms": matmuls * 1e3,
    "head_ms": head * 1e3,
    "rest_ms": (per_token - matmuls - head) * 1e3,
    "decode_tokens_per_s": step["decode_tokens_per_s"],
  }
