"""Running a training config on the command line and killing it with
SIGKILL once a checkpoint exists: the machinery of the exact-resume tests
(dpo_test, grpo_test)."""

import os
import pathlib
import signal
import subprocess
import sys
import time

from qlora_jax.engine.checkpoint import Checkpoints

ROOT = pathlib.Path(__file__).resolve().parent.parent


def run_cli(config: str, workdir, *overrides, wait: bool = True):
  """`python -m experiments.train --config=CONFIG --workdir=WORKDIR ...`:
  its output once it succeeds (`wait`), else the running process."""
  cmd = [
    sys.executable,
    "-m",
    "experiments.train",
    f"--config={config}",
    f"--workdir={workdir}",
    *overrides,
  ]
  proc = subprocess.Popen(
    cmd,
    cwd=ROOT,
    env=dict(os.environ, JAX_PLATFORMS="cpu"),
    stdout=subprocess.PIPE,
    stderr=subprocess.STDOUT,
    text=True,
  )
  if not wait:
    return proc
  out, _ = proc.communicate(timeout=600)
  assert proc.returncode == 0, out[-3000:]
  return out


def kill_after_checkpoint(proc, workdir, step: int) -> int:
  """SIGKILLs `proc` as soon as `workdir` holds a checkpoint of `step` or
  later; returns the newest checkpoint's step (the one a rerun resumes
  from)."""
  workdir = pathlib.Path(workdir)
  deadline = time.time() + 300
  while time.time() < deadline and proc.poll() is None:
    done = [p for p in (workdir / "checkpoints").glob("*") if p.name.isdigit()]
    if any(int(p.name) >= step for p in done):
      break
    time.sleep(0.02)
  proc.send_signal(signal.SIGKILL)
  out, _ = proc.communicate()
  assert proc.returncode == -signal.SIGKILL, (
    "the run ended before the kill:\n" + (out or "")[-3000:]
  )
  return max(Checkpoints(workdir, keep=2).all_steps())
