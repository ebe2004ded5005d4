"""Greedy generation speed: ours (float, NF4 + DQ, and the GGUF's Q4_1
codes as stored) vs transformers (float, and bitsandbytes NF4 + DQ) and
llama.cpp (the same Q4_1 file) on the same model and prompts.

python -m experiments.bench_generate [--batches 1,8 --prompt_len 64 \
  --new_tokens 128 --checkpoint smollm2]
python -m experiments.bench_generate --profile   # where a step goes

SmolLM2-135M-Instruct from its GGUF file by default. Each (implementation,
weights, batch) runs in its own process: time to first token, and decode
tokens/s with the KV cache (median of 3 after a warm-up). transformers
reads the Hugging Face folder that experiments.convert writes from the same
file, and the same prompt token ids (real docstrings, 64 tokens);
llama.cpp (llama-cpp-python, when installed) runs the GGUF file itself,
one sequence per row, with as many threads as cores. Goals: ours >= 2x
transformers + bitsandbytes at batch 1; our NF4 decode >= 0.8x our float
decode; our decode over the Q4_1 codes >= 1.0x llama.cpp's on the same
file at batch 1. The last line is one JSON object.
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
_LLAMA_CPP = flags.DEFINE_enum(
  "llama_cpp", "auto", ["auto", "on", "off"], "llama.cpp rows."
)
_PROFILE = flags.DEFINE_bool(
  "profile",
  False,
  "Instead: where our batch-1 decoding step goes, for each weight format.",
)
_WORKER = flags.DEFINE_string(
  "worker", None, "Internal: IMPL:WEIGHTS:BATCH:DIR."
)
LABELS = {
  ("ours", "float"): "qlora_jax float",
  ("ours", "nf4"): "qlora_jax nf4+dq",
  ("ours", "q4_1"): "qlora_jax q4_1 codes",
  ("hf", "float"): "transformers float",
  ("hf", "nf4"): "transformers + bnb nf4+dq",
  ("llamacpp", "q4_1"): "llama.cpp q4_1",
}

GiB = 2**30


def _worker(spec: str) -> None:
  impl, weights, batch, folder = spec.split(":", 3)
  batch = int(batch)
  if impl == "parts":
    result = generate.decode_parts(
      _CHECKPOINT.value, weights, _PROMPT.value, _NEW.value, folder
    )
  elif impl == "ours":
    result = generate.decode_speed(
      _CHECKPOINT.value, weights, batch, _PROMPT.value, _NEW.value, folder
    )
  else:
    ids = np.load(os.path.join(folder, f"ids_{batch}.npy"))
    if impl == "hf":
      from experiments.peers import hf_generate  # noqa: PLC0415

      result = hf_generate.decode_speed(
        os.path.join(folder, "hf"), weights == "nf4", ids, _NEW.value
      )
    else:
      from experiments.peers import llamacpp_generate  # noqa: PLC0415

      path = str(setup.resolve_checkpoint(_CHECKPOINT.value))
      result = llamacpp_generate.decode_speed(path, ids, _NEW.value)
  print(json.dumps(result))


def _run(impl: str, weights: str, batch: int, folder: str) -> dict:
  return workers.run_worker(
    "experiments.bench_generate",
    f"{impl}:{weights}:{batch}:{folder}",
    [
      f"--checkpoint={_CHECKPOINT.value}",
      f"--prompt_len={_PROMPT.value}",
      f"--new_tokens={_NEW.value}",
    ],
  )


def _profile() -> None:
  """Milliseconds per batch-1 decoding token: the step, its linear
  layers' matmuls, its head and the rest, per weight format."""
  summary = {"profile": True, "cpu_count": os.cpu_count()}
  with tempfile.TemporaryDirectory() as folder:
    for weights in ("float", "nf4", "q4_1"):
      r = _run("parts", weights, 1, folder)
      step = r["step_ms"]
      print(
        f"{LABELS['ours', weights]:<22} step {step:6.2f} ms: matmuls "
        f"{r['matmuls_ms']:6.2f} ({r['matmuls_ms'] / step:4.0%}, "
        f"{r['linear_layers']} layers, "
        f"{r['linear_weight_bytes'] / 2**20:.1f} MiB), {r['head']} head "
        f"{r['head_ms']:5.2f} ({r['head_ms'] / step:4.0%}), rest "
        f"{r['rest_ms']:5.2f} ({r['rest_ms'] / step:4.0%})",
        flush=True,
      )
      for key in ("step_ms", "matmuls_ms", "head_ms", "rest_ms"):
        summary[f"{weights}_{key}"] = round(r[key], 3)
  print(json.dumps(summary))


def main(argv):
  del argv
  if _WORKER.value:
    _worker(_WORKER.value)
    return
  if _PROFILE.value:
    _profile()
    return
  peers = workers.peers_available(
    _PEERS.value, ("torch", "transformers", "bitsandbytes")
  )
  llama_cpp = workers.peers_available(_LLAMA_CPP.value, ("llama_cpp",))
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
      runs = [("ours", "float"), ("ours", "nf4")]
      if peers:
        runs += [("hf", "float"), ("hf", "nf4")]
      if llama_cpp:
        runs += [("ours", "q4_1"), ("llamacpp", "q4_1")]
      for impl, weights in runs:
        r = _run(impl, weights, b, folder)
        results[f"{impl}_{weights}_b{b}"] = r
        print(
          f"{LABELS[impl, weights]:<27} batch {b}: "
          f"first token {r['time_to_first_token_s'] * 1e3:7.1f} ms, decode "
          f"{r['decode_tokens_per_s']:8.1f} tokens/s, peak RSS "
          f"{r['peak_rss_bytes'] / GiB:.2f} GiB",
          flush=True,
        )
  summary = {
    "peers": peers,
    "llama_cpp": llama_cpp,
    "cpu_count": os.cpu_count(),
  }
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
    if llama_cpp:
      ours_c, cpp = results[f"ours_q4_1_b{b}"], results[f"llamacpp_q4_1_b{b}"]
      vs = ours_c["decode_tokens_per_s"] / cpp["decode_tokens_per_s"]
      summary[f"ours_q4_1_vs_llamacpp_decode_b{b}"] = round(vs, 3)
      ttft = cpp["time_to_first_token_s"] / ours_c["time_to_first_token_s"]
      summary[f"ours_q4_1_vs_llamacpp_first_token_speed_b{b}"] = round(ttft, 3)
      same = ours_c["first_tokens"] == cpp["first_tokens"]
      summary[f"same_first_tokens_q4_1_b{b}"] = same
      print(
        f"batch {b}: our decode over the Q4_1 codes {vs:.2f}x llama.cpp's "
        f"on the same file; first token {ttft:.2f}x as fast; first 8 greedy "
        f"tokens identical: {same}"
      )
  print(json.dumps(summary))


if __name__ == "__main__":
  cli.run(main)
