"""Measuring compiled programs: XLA's memory analysis and step times."""

import ctypes
import resource
import statistics
import time
from collections.abc import Callable

import jax


def compiled_memory(compiled) -> dict[str, int]:
  """Bytes of a compiled program: arguments, temporaries, outputs, aliased.

  `total` = arguments + temporaries + outputs - aliased (donated buffers
  reused for outputs), XLA's own accounting of what the program holds.
  """
  m = compiled.memory_analysis()
  out = {
    "arguments": int(m.argument_size_in_bytes),
    "temporaries": int(m.temp_size_in_bytes),
    "outputs": int(m.output_size_in_bytes),
    "aliased": int(m.alias_size_in_bytes),
  }
  out["total"] = (
    out["arguments"] + out["temporaries"] + out["outputs"] - out["aliased"]
  )
  return out


def median_seconds(
  step: Callable[[], object], warmup: int = 2, repeats: int = 5
) -> float:
  """Median wall time of `step()` (its result is blocked on)."""
  for _ in range(warmup):
    jax.block_until_ready(step())
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(step())
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


def peak_rss_bytes() -> int:
  """Peak resident memory of this process so far (Linux: KiB -> bytes)."""
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _status_bytes(field: str) -> int:
  """A `VmXXX:  N kB` line of /proc/self/status, in bytes."""
  with open("/proc/self/status") as f:
    for line in f:
      if line.startswith(field + ":"):
        return int(line.split()[1]) * 1024
  raise RuntimeError(f"/proc/self/status has no {field}")


def current_rss_bytes() -> int:
  """Resident memory of this process now (Linux)."""
  return _status_bytes("VmRSS")


def reset_peak_rss() -> None:
  """Starts a new peak-RSS window (Linux: writing 5 to /proc/self/clear_refs
  resets VmHWM to the current resident size)."""
  with open("/proc/self/clear_refs", "w") as f:
    f.write("5")


def window_peak_rss_bytes() -> int:
  """Peak resident memory since the last `reset_peak_rss` (VmHWM)."""
  return _status_bytes("VmHWM")


def release_host_memory() -> None:
  """Returns freed heap pages to the OS (glibc's malloc_trim; a no-op
  elsewhere). Compilation and loading free hundreds of MiB that the
  allocator would otherwise keep, and the next phase's peak would stack on
  them."""
  try:
    libc = ctypes.CDLL("libc.so.6")
  except OSError:
    return
  libc.malloc_trim(0)
