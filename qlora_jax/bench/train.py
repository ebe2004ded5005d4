"""Train-step throughput of this codebase on a random Llama-shaped model.

One call measures one training mode in the current process: tokens per
second (median step time after warm-up, every step blocked on) and the
process's peak resident memory. experiments/bench_train.py runs each mode
in its own process, next to the same measurement with PEFT + bitsandbytes.
"""

import pathlib
import time
from typing import Any

import numpy as np

from qlora_jax import models
from qlora_jax import nn as qnn
from qlora_jax.bench.layers import mode_inputs
from qlora_jax.engine import profiling, steps
from qlora_jax.engine.recipes import RECIPES as MODES


def llama_config(
  hidden: int = 512,
  layers: int = 4,
  heads: int = 8,
  intermediate: int = 1408,
  vocab: int = 32000,
) -> dict[str, Any]:
  """A config.json (as a dict) of a Llama-shaped model; untied head."""
  return {
    "model_type": "llama",
    "vocab_size": vocab,
    "hidden_size": hidden,
    "intermediate_size": intermediate,
    "num_hidden_layers": layers,
    "num_attention_heads": heads,
    "num_key_value_heads": heads,
    "max_position_embeddings": 2048,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "tie_word_embeddings": False,
  }


def write_random_llama(folder, config: dict, seed: int = 0) -> None:
  """A Hugging Face Llama folder with N(0, 0.02) weights and unit norms, so
  that every implementation under test loads the same checkpoint."""
  import json  # noqa: PLC0415
  import pathlib  # noqa: PLC0415

  from safetensors.numpy import save_file  # noqa: PLC0415

  folder = pathlib.Path(folder)
  folder.mkdir(parents=True, exist_ok=True)
  rng = np.random.default_rng(seed)
  h, m = config["hidden_size"], config["intermediate_size"]
  kv = config["num_key_value_heads"] * h // config["num_attention_heads"]

  def normal(*shape):
    return (0.02 * rng.standard_normal(shape)).astype(np.float32)

  tensors = {"model.embed_tokens.weight": normal(config["vocab_size"], h)}
  for i in range(config["num_hidden_layers"]):
    p = f"model.layers.{i}."
    tensors.update(
      {
        p + "self_attn.q_proj.weight": normal(h, h),
        p + "self_attn.k_proj.weight": normal(kv, h),
        p + "self_attn.v_proj.weight": normal(kv, h),
        p + "self_attn.o_proj.weight": normal(h, h),
        p + "mlp.gate_proj.weight": normal(m, h),
        p + "mlp.up_proj.weight": normal(m, h),
        p + "mlp.down_proj.weight": normal(h, m),
        p + "input_layernorm.weight": np.ones(h, np.float32),
        p + "post_attention_layernorm.weight": np.ones(h, np.float32),
      }
    )
  tensors["model.norm.weight"] = np.ones(h, np.float32)
  if not config.get("tie_word_embeddings", False):
    tensors["lm_head.weight"] = normal(config["vocab_size"], h)
  save_file(tensors, str(folder / "model.safetensors"))
  full = dict(config, architectures=["LlamaForCausalLM"], torch_dtype="float32")
  (folder / "config.json").write_text(json.dumps(full, indent=2))


def _plan(mode: str, rank: int):
  if mode not in MODES:
    raise ValueError(f"unknown mode {mode!r}, expected {list(MODES)}")
  lora, quant_cfg, base_dtype, _ = mode_inputs(mode, rank)
  return lora, quant_cfg, base_dtype


def _options(mode: str, rank: int, scan_layers, remat) -> models.ModelOptions:
  lora, quant_cfg, base_dtype = _plan(mode, rank)
  return models.ModelOptions(
    lora=lora,
    quant=quant_cfg,
    base_dtype=base_dtype,
    scan_layers=scan_layers,
    remat=remat,
  )


def train_throughput(
  mode: str,
  checkpoint,
  *,
  batch: int = 4,
  seq: int = 128,
  rank: int = 16,
  steps_timed: int = 10,
  warmup: int = 3,
  scan_layers: bool = True,
  remat: bool = False,
  seed: int = 0,
) -> dict[str, Any]:
  """Trains `mode` from `checkpoint` on random tokens; returns tokens/s,
  step time and memory.

  The train step is compiled from abstract shapes before any weight is
  loaded, and freed heap is returned to the OS between phases, so that the
  peak of one phase (compiling, loading, training) does not stack on the
  leftovers of the previous one.
  """
  patterns = mode_inputs(mode, rank)[3]
  config = models.read_config(pathlib.Path(checkpoint) / "config.json")
  spec = models.ModelSpec(config, "causal_lm")
  options = _options(mode, rank, scan_layers, remat)
  step = steps.abstract_step(
    spec,
    models.layer_options(spec, options),
    batch=batch,
    seq=seq,
    train_patterns=patterns,
    seed=seed,
  )
  rng = np.random.default_rng(seed)
  t0 = time.perf_counter()
  compiled = step.compile()
  compile_s = time.perf_counter() - t0
  memory = profiling.compiled_memory(compiled)["total"]
  profiling.release_host_memory()
  lm = models.from_pretrained(checkpoint, options)
  trainable, frozen = qnn.split_trainable(lm.variables, patterns)
  state = steps.create_state(trainable, step.tx, seed)
  del lm, trainable
  profiling.release_host_memory()
  times, losses = [], []
  for i in range(warmup + steps_timed):
    b = steps.random_lm_batch(rng, config.vocab_size, batch, seq)
    t = time.perf_counter()
    state, metrics = compiled(state, b, frozen)
    losses.append(float(metrics["loss"]) / float(metrics["weight"]))
    if i >= warmup:
      times.append(time.perf_counter() - t)
  step_s = float(np.median(times))
  return {
    "impl": "qlora_jax",
    "mode": mode,
    "tokens_per_s": batch * seq / step_s,
    "step_s": step_s,
    "peak_rss_bytes": profiling.peak_rss_bytes(),
    "compile_s": compile_s,
    "train_step_memory_bytes": memory,
    "trainable_params": qnn.num_params(state.params),
    "total_params": qnn.num_params(state.params) + qnn.num_params(frozen),
    "first_loss": losses[0],
    "last_loss": losses[-1],
  }
