"""Large Llama checkpoints on disk, and training them from disk (bench_scale).

`write_sharded_llama` writes a Llama-shaped Hugging Face folder with random
weights as sharded safetensors (`model.safetensors.index.json`, shards of
about `SHARD_BYTES`), one tensor at a time: each is generated, written and
freed, so writing a 13B checkpoint holds one tensor at a time (its float32
draw and its bfloat16 copy, ~1 GB for the 13B embedding). Shards are
written under a `.partial` folder renamed when complete; `cached_llama`
reuses a complete folder.

`train_from_disk` is one measured run in the calling process: the train
step compiled from abstract shapes first, then `models.from_pretrained`
(quantize-on-load), then the steps; the peak resident memory of loading
and of training are measured separately (Linux's VmHWM, reset between the
phases through /proc/self/clear_refs).
"""

import json
import math
import os
import pathlib
import shutil
import struct
import time
import zlib
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from qlora_jax import models
from qlora_jax import nn as qnn
from qlora_jax.bench import families
from qlora_jax.bench.layers import mode_inputs
from qlora_jax.engine import profiling, steps
from qlora_jax.models.minilm import cache_dir

SHARD_BYTES = 2 * 10**9
INDEX = "model.safetensors.index.json"
_ST_DTYPES = {
  "bfloat16": ("BF16", ml_dtypes.bfloat16),
  "float32": ("F32", np.float32),
}


def tensor_shapes(config: dict[str, Any]) -> list[tuple[str, tuple[int, ...]]]:
  """(Hugging Face name, shape) of every tensor of a Llama config, in the
  order transformers writes them."""
  h, inter = config["hidden_size"], config["intermediate_size"]
  heads, kv = config["num_attention_heads"], config["num_key_value_heads"]
  d = h // heads
  out = [("model.embed_tokens.weight", (config["vocab_size"], h))]
  for i in range(config["num_hidden_layers"]):
    p = f"model.layers.{i}."
    out += [
      (p + "self_attn.q_proj.weight", (heads * d, h)),
      (p + "self_attn.k_proj.weight", (kv * d, h)),
      (p + "self_attn.v_proj.weight", (kv * d, h)),
      (p + "self_attn.o_proj.weight", (h, heads * d)),
      (p + "mlp.gate_proj.weight", (inter, h)),
      (p + "mlp.up_proj.weight", (inter, h)),
      (p + "mlp.down_proj.weight", (h, inter)),
      (p + "input_layernorm.weight", (h,)),
      (p + "post_attention_layernorm.weight", (h,)),
    ]
  out.append(("model.norm.weight", (h,)))
  if not config.get("tie_word_embeddings", False):
    out.append(("lm_head.weight", (config["vocab_size"], h)))
  return out


def random_tensor(name: str, shape, seed: int, dtype: str) -> np.ndarray:
  """N(0, 0.02) for matrices, ones for norms; a function of (seed, name)."""
  np_dtype = _ST_DTYPES[dtype][1]
  if len(shape) == 1:
    return np.ones(shape, np_dtype)
  rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
  x = rng.standard_normal(shape, dtype=np.float32)
  x *= 0.02
  return x.astype(np_dtype)


def _shards(shapes, itemsize: int, shard_bytes: int) -> list[list]:
  shards, current, size = [], [], 0
  for name, shape in shapes:
    n = math.prod(shape) * itemsize
    if current and size + n > shard_bytes:
      shards.append(current)
      current, size = [], 0
    current.append((name, shape))
    size += n
  if current:
    shards.append(current)
  return shards


def _write_shard(path, tensors, seed: int, dtype: str) -> None:
  code, np_dtype = _ST_DTYPES[dtype]
  itemsize = np.dtype(np_dtype).itemsize
  header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
  offset = 0
  for name, shape in tensors:
    n = math.prod(shape) * itemsize
    header[name] = {
      "dtype": code,
      "shape": list(shape),
      "data_offsets": [offset, offset + n],
    }
    offset += n
  text = json.dumps(header, separators=(",", ":")).encode()
  text += b" " * (-len(text) % 8)
  with open(path, "wb") as f:
    f.write(struct.pack("<Q", len(text)))
    f.write(text)
    for name, shape in tensors:
      random_tensor(name, shape, seed, dtype).tofile(f)


def write_sharded_llama(
  folder: str | os.PathLike,
  config: dict[str, Any],
  *,
  dtype: str = "bfloat16",
  shard_bytes: int = SHARD_BYTES,
  seed: int = 0,
) -> pathlib.Path:
  """Writes the folder (config.json, shards, index); returns its path."""
  folder = pathlib.Path(folder)
  partial = folder.with_name(folder.name + ".partial")
  shutil.rmtree(partial, ignore_errors=True)
  partial.mkdir(parents=True)
  shapes = tensor_shapes(config)
  itemsize = np.dtype(_ST_DTYPES[dtype][1]).itemsize
  shards = _shards(shapes, itemsize, shard_bytes)
  weight_map, total = {}, 0
  for i, tensors in enumerate(shards):
    name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
    _write_shard(partial / name, tensors, seed, dtype)
    for key, shape in tensors:
      weight_map[key] = name
      total += math.prod(shape) * itemsize
  index = {"metadata": {"total_size": total}, "weight_map": weight_map}
  (partial / INDEX).write_text(json.dumps(index, indent=1))
  full = dict(config, architectures=["LlamaForCausalLM"], torch_dtype=dtype)
  (partial / "config.json").write_text(json.dumps(full, indent=2))
  shutil.rmtree(folder, ignore_errors=True)
  partial.rename(folder)
  return folder


def cached_llama(
  shape: str, cache: str | os.PathLike | None = None, seed: int = 0
) -> pathlib.Path:
  """The folder of a `families.FAMILY` shape in bfloat16, written once."""
  folder = cache_dir(cache) / "bench_scale" / f"llama-{shape}-bf16-seed{seed}"
  if (folder / INDEX).is_file() and (folder / "config.json").is_file():
    return folder
  return write_sharded_llama(
    folder, families.family_config_dict(shape), seed=seed
  )


class GeneratedLlama:
  """The tensors `write_sharded_llama(folder, config, seed=seed)` would
  write, each made when it is read: a checkpoint that no disk holds (the
  33B shape's 65 GB), read by `models.from_checkpoint` tensor by tensor
  as a folder would be."""

  def __init__(self, config: dict[str, Any], seed: int = 0):
    self.dtype, self.seed = "bfloat16", seed
    self.config = dict(
      config, architectures=["LlamaForCausalLM"], torch_dtype=self.dtype
    )
    self._shapes = dict(tensor_shapes(config))
    self.folder = pathlib.Path(f"generated-llama-seed{seed}")
    self.where = {k: self.folder for k in self._shapes}

  def keys(self) -> list[str]:
    return list(self._shapes)

  def file(self, key: str) -> pathlib.Path:
    return self.folder

  def shape(self, key: str) -> tuple[int, ...]:
    return self._shapes[key]

  def read(self, key: str) -> np.ndarray:
    return random_tensor(key, self._shapes[key], self.seed, self.dtype)


def generated_llama(shape: str, seed: int = 0) -> GeneratedLlama:
  """A `families.FAMILY` shape's checkpoint, generated as it is read."""
  return GeneratedLlama(families.family_config_dict(shape), seed)


def checkpoint_bytes(folder: pathlib.Path) -> int:
  return sum(p.stat().st_size for p in folder.glob("*.safetensors"))


def frozen_dtypes(mode: str, rank: int = 16):
  """(base dtype, embedding dtype) of `mode` over these bfloat16
  checkpoints. Frozen floats that are not quantized (embeddings, norms, an
  untied head) stay in the checkpoint's bfloat16 as PEFT + bitsandbytes
  keep them: lossless, half the bytes of float32, and the matmuls upcast
  them a chunk at a time. LoRA over a float32 base keeps its base (and
  the small norms) in float32; full fine-tuning trains everything in
  float32."""
  _, quant_cfg, base_dtype, patterns = mode_inputs(mode, rank)
  if patterns:  # full fine-tuning
    return base_dtype, None
  if quant_cfg is not None:
    return jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.bfloat16)
  return base_dtype, jnp.dtype(jnp.bfloat16)


def train_from_disk(
  folder: str | os.PathLike | GeneratedLlama,
  mode: str,
  *,
  batch: int = 1,
  seq: int = 256,
  rank: int = 16,
  steps_run: int = 3,
  dtype: Any = jnp.float32,
  seed: int = 0,
) -> dict[str, Any]:
  """Loads `folder` (or a generated checkpoint) for `mode` and trains
  `steps_run` steps on random tokens (remat, scanned layers, AdamW);
  returns the figures."""
  lora, quant_cfg, _, patterns = mode_inputs(mode, rank)
  base_dtype, embed_dtype = frozen_dtypes(mode, rank)
  if mode == "lora_bf16":  # keep the base in bf16 end to end: no f32 copy
    dtype = jnp.bfloat16
  if isinstance(folder, GeneratedLlama):
    generated = folder
    config = models.from_dict(generated.config)

    def load(options):
      return models.from_checkpoint(generated, generated.config, options)

  else:
    folder = pathlib.Path(folder)
    config = models.read_config(folder / "config.json")

    def load(options):
      return models.from_pretrained(folder, options)

  spec = models.ModelSpec(config, "causal_lm")
  options = models.ModelOptions(
    lora=lora,
    quant=quant_cfg,
    dtype=dtype,
    base_dtype=base_dtype,
    embed_dtype=embed_dtype,
    scan_layers=True,
    remat=True,
  )
  step = steps.abstract_step(
    spec,
    models.layer_options(spec, options),
    batch=batch,
    seq=seq,
    train_patterns=patterns,
    seed=seed,
  )
  tx = step.tx
  rng = np.random.default_rng(seed)
  vocab = config.vocab_size
  t0 = time.perf_counter()
  compiled = step.compile()
  compile_s = time.perf_counter() - t0
  xla_bytes = profiling.compiled_memory(compiled)["total"]
  profiling.release_host_memory()
  base_rss = profiling.current_rss_bytes()
  profiling.reset_peak_rss()
  t0 = time.perf_counter()
  lm = load(options)
  trainable, frozen = qnn.split_trainable(lm.variables, patterns)
  state = steps.create_state(trainable, tx, seed)
  jax.block_until_ready((state, frozen))
  load_s = time.perf_counter() - t0
  del lm, trainable
  load_peak = profiling.window_peak_rss_bytes()
  profiling.release_host_memory()
  profiling.reset_peak_rss()
  times, losses = [], []
  for _ in range(steps_run):
    b = steps.random_lm_batch(rng, vocab, batch, seq)
    t = time.perf_counter()
    state, metrics = compiled(state, b, frozen)
    losses.append(float(metrics["loss"]) / float(metrics["weight"]))
    times.append(time.perf_counter() - t)
  train_peak = profiling.window_peak_rss_bytes()
  step_s = float(np.median(times[1:] if len(times) > 1 else times))
  return {
    "impl": "qlora_jax",
    "mode": mode,
    "params": qnn.num_params(state.params) + qnn.num_params(frozen),
    "trainable_params": qnn.num_params(state.params),
    "compile_s": compile_s,
    "load_s": load_s,
    "runtime_rss_bytes": base_rss,
    "load_peak_rss_bytes": load_peak,
    "train_peak_rss_bytes": train_peak,
    "xla_step_bytes": xla_bytes,
    "step_s": step_s,
    "step_times_s": times,
    "tokens_per_s": batch * seq / step_s,
    "losses": losses,
    "finite": bool(np.all(np.isfinite(losses))),
    "dtype": jnp.dtype(dtype).name,
  }
