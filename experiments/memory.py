"""What a run will need per device, and the largest Llama shape that fits.

python -m experiments.memory [--config configs/default.py]
  [--devices 8 --device_memory 16GiB] [--config.train.batch_size=...]

Prints the memory model's breakdown of the config's run (frozen weights,
trainable parameters, gradients, optimizer state, activations, the largest
transient), per device over `--devices` devices as the config's mesh
splits them, then for every Llama family shape (1B to 65B) and training
mode the predicted bytes per device at the config's batch, sequence
length, LoRA rank, remat and compute dtype, and the largest shape of each
mode that fits `--device_memory` (default: this machine's memory). Nothing
is loaded or allocated.
"""

import time

from absl import flags
from ml_collections import config_flags

from qlora_jax import models
from qlora_jax.bench import families
from qlora_jax.engine import cli, lowering, memory, memory_check, setup
from qlora_jax.engine.settings import DTYPES, Settings

_CONFIG = config_flags.DEFINE_config_file(
  "config", "configs/default.py", "Config file.", lock_config=True
)
_DEVICES = flags.DEFINE_integer("devices", 1, "Devices of the mesh.")
_MEMORY = flags.DEFINE_string(
  "device_memory", None, "Memory of one device (16GiB, 80GB); default: here."
)
_LOWER = flags.DEFINE_list(
  "lower",
  [],
  "Also lower the config's whole train step with jax.export for these "
  "platforms (cuda, rocm, tpu), fused kernels included.",
)
_PLATFORM = flags.DEFINE_enum(
  "platform",
  None,
  ["cpu", "gpu", "tpu"],
  "The devices planned for (default: this machine's backend).",
)
_SHAPES = flags.DEFINE_bool(
  "shapes", True, "Also tabulate the Llama family shapes."
)


def main(argv):
  del argv
  s = Settings.from_config(_CONFIG.value)
  device_memory = (
    memory.parse_bytes(_MEMORY.value)
    if _MEMORY.value
    else memory_check.available_memory()
  )
  if s.model.checkpoint:
    config = models.checkpoint_config(
      setup.resolve_checkpoint(s.model.checkpoint)
    )
  else:
    config = models.from_dict(dict(s.model.hf_config))
  n = _DEVICES.value
  platform = _PLATFORM.value
  p = memory.estimate_settings(s, config, n, num_labels=2, platform=platform)
  where = f"{n} device(s)" if n > 1 else "one device"
  adapters = s.lora_plan() is not None
  base = p.params - (p.trainable_params if adapters else 0)
  batch = f"batch {s.train.batch_size}"
  if s.train.objective == "dpo":  # a chosen and a rejected row per pair
    batch = f"DPO, batch {s.train.batch_size} pairs (2 sequences each)"
  if s.train.objective == "grpo":  # G completions per prompt
    batch = (
      f"GRPO, batch {s.train.batch_size} prompts ({s.grpo.group_size} "
      "completions each)"
    )
  print(
    f"{s.model.checkpoint or config.model_type}: {base / 1e6:,.1f}M "
    f"parameters, {p.trainable_params / 1e6:,.2f}M trainable, {batch} x "
    f"{s.data.max_length} tokens, remat "
    f"{s.model.remat}, on {where} of {memory.format_bytes(device_memory)}"
  )
  for line in p.lines():
    print(line)
  print("fits" if p.total <= device_memory else "DOES NOT FIT")
  for platform in _LOWER.value:
    start = time.perf_counter()
    low = lowering.export_train_step(s, config, platform, num_labels=2)
    calls = ", ".join(f"{k} x{v}" for k, v in low.custom_calls.items())
    print(
      f"lowered for {platform} in {time.perf_counter() - start:.1f} s: "
      f"{len(low.text) / 1e6:.2f} MB of StableHLO; custom calls: "
      f"{calls or 'none'}"
    )
  if not _SHAPES.value:
    return
  rank = s.lora.rank
  data, fsdp = s.mesh.data, s.mesh.fsdp
  fsdp = n // max(1, data) if fsdp == -1 else fsdp
  data = n // max(1, fsdp) if data == -1 else data
  print(
    f"\nLlama shapes, GiB per device (LoRA r={rank} on all linear layers; "
    f"mesh data {data} x fsdp {fsdp}; '(no)': does not fit)"
  )
  lines, largest = families.plan_table(
    device_memory,
    rank=rank,
    batch=memory.rows_per_example(s) * s.train.batch_size,
    seq=s.data.max_length,
    mesh=(data, fsdp),
    remat=s.model.remat,
    dtype=DTYPES[s.model.dtype],
    platform=platform,
  )
  for line in lines:
    print(line)
  for mode, name in largest.items():
    print(f"largest that fits, {mode}: {name or 'none'}")


if __name__ == "__main__":
  cli.run(main)
