"""The benchmark catalogue: Llama shapes from 1B to 70B and the memory
table of every training mode over them (`experiments.memory`,
`experiments.bench_scale`)."""

from collections.abc import Sequence
from typing import Any

import jax.numpy as jnp

from qlora_jax import models
from qlora_jax.engine import memory, recipes
from qlora_jax.engine.memory import GiB

# Llama-family shapes (vocabulary 32,000, untied head): Llama-2 7B / 13B,
# LLaMA 33B / 65B, and two smaller ones of the same family for the curve
# (TinyLlama-1.1B's shape, OpenLLaMA-3B's).
FAMILY: dict[str, dict[str, int]] = {
  "1b": {"hidden": 2048, "layers": 22, "heads": 32, "kv": 4, "mlp": 5632},
  "3b": {"hidden": 3200, "layers": 26, "heads": 32, "kv": 32, "mlp": 8640},
  "7b": {"hidden": 4096, "layers": 32, "heads": 32, "kv": 32, "mlp": 11008},
  "13b": {"hidden": 5120, "layers": 40, "heads": 40, "kv": 40, "mlp": 13824},
  "33b": {"hidden": 6656, "layers": 60, "heads": 52, "kv": 52, "mlp": 17920},
  "65b": {"hidden": 8192, "layers": 80, "heads": 64, "kv": 64, "mlp": 22016},
}


VOCAB = 32_000


def family_config_dict(name: str) -> dict[str, Any]:
  """The config.json (as a dict) of a `FAMILY` shape."""
  if name not in FAMILY:
    raise ValueError(f"unknown shape {name!r}, expected one of {list(FAMILY)}")
  f = FAMILY[name]
  return {
    "model_type": "llama",
    "vocab_size": VOCAB,
    "hidden_size": f["hidden"],
    "intermediate_size": f["mlp"],
    "num_hidden_layers": f["layers"],
    "num_attention_heads": f["heads"],
    "num_key_value_heads": f["kv"],
    "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-5,
    "tie_word_embeddings": False,
  }


MODES = tuple(recipes.RECIPES)  # full, lora_f32, lora_bf16, qlora_nf4_dq


def estimate_mode(
  config, mode: str, *, rank: int, batch: int, seq: int, **kw
) -> memory.Breakdown:
  """`memory.estimate` for one of `engine.recipes.RECIPES` with LoRA of
  `rank` on every linear layer."""
  lora, quant_plan, base_dtype, patterns = recipes.plan_inputs(mode, rank)
  return memory.estimate(
    config,
    lora=lora,
    quant_plan=quant_plan,
    train_patterns=patterns,
    batch=batch,
    seq=seq,
    base_dtype=base_dtype,
    **kw,
  )


def plan_table(
  device_memory: int,
  *,
  rank: int,
  batch: int,
  seq: int,
  mesh: tuple[int, int] = (1, 1),
  remat: bool = True,
  dtype: Any = jnp.float32,
  shapes: Sequence[str] = tuple(FAMILY),
  platform: str | None = None,
) -> tuple[list[str], dict[str, str | None]]:
  """(lines of a table: predicted GiB per device of every shape and mode,
  the largest shape that fits each mode) for devices of `device_memory`
  bytes."""
  header = f"  {'shape':<6} {'params':>8}" + "".join(f" {m:>14}" for m in MODES)
  lines, largest = [header], dict.fromkeys(MODES, None)
  sizes: dict[str, int] = {}
  for name in shapes:
    config = models.from_dict(family_config_dict(name))
    cells, params = [], 0
    for m in MODES:
      p = estimate_mode(
        config,
        m,
        rank=rank,
        batch=batch,
        seq=seq,
        mesh=mesh,
        remat=remat,
        dtype=dtype,
        platform=platform,
      )
      adapters = recipes.plan_inputs(m, rank)[0] is not None
      params = p.params - (p.trainable_params if adapters else 0)
      fits = p.total <= device_memory
      sizes[name] = params
      if fits and (largest[m] is None or sizes[largest[m]] < params):
        largest[m] = name
      cells.append(f"{p.total / GiB:.1f}" + ("" if fits else " (no)"))
    lines.append(
      f"  {name:<6} {params / 1e9:>7.2f}B" + "".join(f" {c:>14}" for c in cells)
    )
  return lines, largest
