"""The run-time memory guard: a run the memory model says cannot fit is
refused (or warned of) before anything loads (`train.memory_check`)."""

import os

import jax

from qlora_jax.engine.memory import (
  MiB,
  Shape,
  estimate_settings,
  format_bytes,
  rows_per_example,
)


def available_memory() -> int:
  """Bytes one device can hold: an accelerator's limit; for CPU devices,
  the host's physical memory shared by all of them."""
  dev = jax.local_devices()[0]
  if dev.platform != "cpu":
    stats = dev.memory_stats() or {}
    if "bytes_limit" in stats:
      return int(stats["bytes_limit"])
  host = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
  return host // len(jax.local_devices())  # CPU devices share the host


def rough_bytes(config, batch: int, seq: int) -> int:
  """A bound above every part of `memory.estimate` on one device, from the
  config alone: every weight in float32 with gradients and two moments, every
  layer's activations kept, the largest transients all at once."""
  s = Shape.of(config)
  positions = getattr(config, "max_positions", 0)
  params = (
    s.layers * (s.layer_linear_params + 8 * s.hidden)
    + (2 * s.vocab + positions + 8) * s.hidden
  )
  n = batch * seq
  per_layer = (
    14 * n * s.hidden * 4
    + 9 * n * s.intermediate * 4
    + 6 * batch * s.heads * seq * seq * 4
    + 2 * s.layer_linear_params * 4
  )
  return int(
    20 * params  # weights, two moments, gradients (two with accumulation)
    + (s.layers + 1) * per_layer
    + 16 * s.largest_linear
    + 2 * n * s.vocab * 4
    + 20 * n
    + 2 * MiB
  )


class DoesNotFitError(ValueError):
  """A run predicted not to fit its devices (train.memory_check)."""


def check_fits(
  s,
  config,
  devices: int,
  memory: int | None = None,
  num_labels: int | None = None,
) -> str:
  """'' when the run fits, else the warning; raises under "error".

  The full prediction runs only when `rough_bytes`, a bound above it,
  exceeds the device's memory: small runs are never in doubt.

  Raises:
    DoesNotFitError: predicted total above the device's memory, with the
      breakdown and how to proceed anyway (train.memory_check="warn").
  """
  if s.train.memory_check == "off":
    return ""
  memory = memory or available_memory()
  rows = rows_per_example(s) * s.train.batch_size
  if rough_bytes(config, rows, s.data.max_length) <= memory:
    return ""
  p = estimate_settings(s, config, devices, num_labels)
  if p.total <= memory:
    return ""
  message = (
    f"the memory model predicts {format_bytes(p.total)} per device, more "
    f"than the {format_bytes(memory)} a device has:\n"
    + "\n".join(p.lines())
    + "\nlower train.batch_size / data.max_length, turn on model.remat, "
    "quantize the base, or add devices (mesh.fsdp); "
    'train.memory_check="warn" runs it anyway'
  )
  if s.train.memory_check == "error":
    raise DoesNotFitError(message)
  return message
