"""Benchmark runs in isolated worker processes, and the peers check.

Each measured run gets a fresh process (`python -m MODULE --worker=SPEC
...`), so that one library's memory and compiled code never sit under the
other's figures; the worker prints its result as the last line, one JSON
object.
"""

import json
import subprocess
import sys

# What the PEFT + bitsandbytes peer runs import (the peers extra).
PEER_IMPORTS = ("torch", "transformers", "peft", "bitsandbytes")


class WorkerError(RuntimeError):
  """A worker process failed; the message ends with its stderr."""


def peers_available(setting: str, imports=PEER_IMPORTS) -> bool:
  """`--peers`: "on" / "off" as given; "auto": whether a fresh process can
  import every one of `imports`."""
  if setting not in ("auto", "on", "off"):
    raise ValueError(f"--peers: {setting!r}, expected auto, on or off")
  if setting != "auto":
    return setting == "on"
  probe = subprocess.run(
    [sys.executable, "-c", "import " + ", ".join(imports)],
    capture_output=True,
    check=False,
  )
  return probe.returncode == 0


def run_worker(module: str, spec: str, flags: list[str]) -> dict:
  """`python -m module --worker=spec *flags` in a new process; its last
  stdout line parsed as JSON.

  Raises:
    WorkerError: a non-zero exit (with the last 3,000 characters of
      stderr) or a last line that is not JSON.
  """
  cmd = [sys.executable, "-m", module, f"--worker={spec}", *flags]
  proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
  if proc.returncode != 0:
    raise WorkerError(
      f"{module} worker {spec}: exit {proc.returncode}:\n{proc.stderr[-3000:]}"
    )
  lines = proc.stdout.strip().splitlines()
  try:
    return json.loads(lines[-1])
  except (IndexError, json.JSONDecodeError) as e:
    raise WorkerError(
      f"{module} worker {spec}: its last line is not JSON: "
      f"{(lines or [''])[-1][:200]!r}"
    ) from e
