"""Greedy generation speed: ours (float and NF4 + DQ) vs transformers
(float, and bitsandbytes NF4 + DQ) on the same model and prompts.

python -m experiments.bench_generate [--batches 1,8 --prompt_len 64 \
  --new_tokens 128 --checkpoint smollm2]

SmolLM2-135M-Instruct from its GGUF file by default. Each (implementation,
weights, batch) runs in its own process: time to first token, and decode
tokens/s with the KV cache (median of 3 after a warm-up). transformers
reads the Hugging Face folder that experiments.convert writes from the same
file, and the same prompt token ids (real docstrings, 64 tokens). Goals:
ours >= 2x transformers + bitsandbytes at batch 1; our NF4 decode >= 0.8x
our float decode. The last line is one JSON object.
"""

import json
import os
import tempfile

import numpy as np
from absl import flags

from qlora_jax.bench import generate, workers
from qlora_jax.engine import cli, setup
from qlora_jax.interop import gguf_convert

_CHECKPOINT = flags.DEFINE_string("checkpoint", "smollm2", "A GGUF file.")
_BATCHES = flags.DEFINE_list("batches", ["1", "8"], "Batch sizes.")
_PROMPT = flags.DEFINE_integer("prompt_len", 64, "Prompt tokens.")
_NEW = flags.DEFINE_integer("new_tokens", 128, "New tokens per row.")
_PEERS = flags.DEFINE_enum("peers", "auto", ["auto", "on", "off"], "HF.")
_WORKER = flags.DEFINE_string("worker", None, "Internal: IMPL:Q:BATCH:DIR.")

GiB = 2**30


def _worker(spec: str) -> None:
  impl, quantized, batch, folder = spec.split(":", 3)
  quantized, batch = quantized == "1", int(batch)
  if impl == "ours":
    result = generate.decode_speed(
      _CHECKPOINT.value, quantized, batch, _PROMPT.value, _NEW.value, folder
    )
  else:
    from experiments.peers import hf_generate  # noqa: PLC0415

    ids = np.load(os.path.join(folder, f"ids_{batch}.npy"))
    result = hf_generate.decode_speed(
      os.path.join(folder, "hf"), quantized, ids, _NEW.value
    )
  print(json.dumps(result))


def _run(impl: str, quantized: bool, batch: int, folder: str) -> dict:
  return workers.run_worker(
    "experiments.bench_generate",
    f"{impl}:{int(quantized)}:{batch}:{folder}",
    [
      f"--checkpoint={_CHECKPOINT.value}",
      f"--prompt_len={_PROMPT.value}",
      f"--new_tokens={_NEW.value}",
    ],
  )


def main(argv):
  del argv
  if _WORKER.value:
    _worker(_WORKER.value)
    return
  peers = workers.peers_available(
    _PEERS.value, ("torch", "transformers", "bitsandbytes")
  )
  path = setup.resolve_checkpoint(_CHECKPOINT.value)
  tok = setup.load_tokenizer(path)
  results = {}
  with tempfile.TemporaryDirectory() as folder:
    for b in _BATCHES.value:
      ids = generate.prompt_ids(tok, int(b), _PROMPT.value, folder)
      np.save(os.path.join(folder, f"ids_{b}.npy"), ids)
    if peers:
      gguf_convert.convert(path, os.path.join(folder, "hf"))
    for b in (int(v) for v in _BATCHES.value):
      runs = [("ours", False), ("ours", True)]
      if peers:
        runs += [("hf", False), ("hf", True)]
      for impl, q in runs:
        r = _run(impl, q, b, folder)
        key = f"{impl}_{'nf4' if q else 'float'}_b{b}"
        results[key] = r
        print(
          f"{r['impl']:<28} {'nf4+dq' if q else 'float':<6} batch {b}: "
          f"first token {r['time_to_first_token_s'] * 1e3:7.1f} ms, decode "
          f"{r['decode_tokens_per_s']:8.1f} tokens/s, peak RSS "
          f"{r['peak_rss_bytes'] / GiB:.2f} GiB",
          flush=True,
        )
  summary = {"peers": peers, "cpu_count": os.cpu_count()}
  for key, r in results.items():
    summary[f"{key}_decode_tokens_per_s"] = round(r["decode_tokens_per_s"], 1)
    summary[f"{key}_ttft_ms"] = round(r["time_to_first_token_s"] * 1e3, 1)
  for b in _BATCHES.value:
    ours_q, ours_f = results[f"ours_nf4_b{b}"], results[f"ours_float_b{b}"]
    ratio = ours_q["decode_tokens_per_s"] / ours_f["decode_tokens_per_s"]
    summary[f"ours_nf4_vs_float_decode_b{b}"] = round(ratio, 3)
    print(f"batch {b}: our NF4 decode {ratio:.2f}x our float decode")
    if peers:
      hf_q = results[f"hf_nf4_b{b}"]
      vs = ours_q["decode_tokens_per_s"] / hf_q["decode_tokens_per_s"]
      summary[f"ours_nf4_vs_hf_bnb_decode_b{b}"] = round(vs, 3)
      same = ours_f["first_tokens"] == results[f"hf_float_b{b}"]["first_tokens"]
      summary[f"same_first_tokens_float_b{b}"] = same
      print(
        f"batch {b}: our NF4 decode {vs:.2f}x transformers + bitsandbytes; "
        f"float greedy tokens identical: {same}"
      )
  print(json.dumps(summary))


if __name__ == "__main__":
  cli.run(main)
