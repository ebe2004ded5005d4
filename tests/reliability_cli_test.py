"""The command lines fail as a person needs: one line naming the path,
field or flag and what to do, exit status 1; the traceback only with -v 1;
Ctrl-C one line and exit status 130, a checkpoint save included.

Each case is a real `python -m experiments.*` process on the tiny
fixtures; the policy itself is tested in cli_test.py.
"""

import os
import pathlib
import signal
import subprocess
import sys
import time

import pytest

from tests import tiny_config

ROOT = pathlib.Path(__file__).resolve().parent.parent
LLAMA = ROOT / "tests/data/hf/llama_gqa"
ENV = dict(os.environ, JAX_PLATFORMS="cpu")


def _run(module: str, *args: str, **kwargs) -> subprocess.CompletedProcess:
  return subprocess.run(
    [sys.executable, "-m", module, *args],
    cwd=ROOT,
    env=ENV,
    capture_output=True,
    text=True,
    check=False,
    timeout=300,
    **kwargs,
  )


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  folder = tmp_path_factory.mktemp("data")
  tiny_config.write_dataset(folder, n_train=16, n_eval=8)
  return folder


def test_plain_text_rows_under_an_instruction_config_say_what_to_set(
  data_dir, tmp_path
):
  proc = _run(
    "experiments.train",
    f"--config=tests/tiny_config.py:{data_dir}",
    f"--config.model.checkpoint={LLAMA}",
    "--config.model.task=causal_lm",
    "--config.data.instruction=True",
    "--config.data.chat_template=none",
    f"--workdir={tmp_path / 'run'}",
  )
  assert proc.returncode == 1, proc.stderr[-3000:]
  train = data_dir / "train.jsonl"
  assert proc.stderr.splitlines() == [
    f'error: {train}:1: missing field "prompt": this is instruction data '
    '({"prompt", "completion"} or {"messages"} rows); a {"text"} row is '
    "plain text, which data.instruction=False trains on"
  ]


def test_a_workdir_that_cannot_be_made_names_its_path(data_dir, tmp_path):
  blocker = tmp_path / "a_file"
  blocker.write_text("")
  workdir = blocker / "run"
  # With -v 1: the traceback, and the line that alone ends a run without.
  proc = _run(
    "experiments.train",
    f"--config=tests/tiny_config.py:{data_dir}",
    f"--workdir={workdir}",
    "-v",
    "1",
  )
  assert proc.returncode == 1
  assert "Traceback (most recent call last):" in proc.stderr
  line = (
    f"error: {workdir}: Not a directory (a part of the path is a file, not "
    "a folder)"
  )
  assert line in proc.stderr.splitlines()


def test_predict_refuses_bad_flags_before_loading(tmp_path):
  proc = _run(
    "experiments.predict",
    f"--workdir={tmp_path / 'no_run'}",  # never read: the flags fail first
    "--text=hello",
    "--max_new_tokens=0",
    "--temperature=-1",
  )
  assert proc.returncode == 1
  assert proc.stderr.splitlines() == [
    "error: max_new_tokens must be >= 1, got 0; temperature must be >= 0 "
    "(0: greedy), got -1.0"
  ]


# An entry point that only saves checkpoints, as the training loop does
# (`Checkpoints.save`), 16 MB each: a Ctrl-C lands inside a save.
SAVING = """
import numpy as np
from qlora_jax.engine import cli
from qlora_jax.engine.checkpoint import Checkpoints


def main(argv):
  checkpoints = Checkpoints(argv[1], keep=2)
  state = {"w": np.ones((4096, 1024), np.float32)}
  for step in range(1, 100000):
    checkpoints.save(step, state, {"step": step})


cli.run(main)
"""


def test_ctrl_c_in_a_checkpoint_save_is_one_line_and_130(tmp_path):
  # Was 829 lines: orbax's logged tracebacks and the interpreter's.
  proc = subprocess.Popen(
    [sys.executable, "-c", SAVING, str(tmp_path)],
    cwd=ROOT,
    env=ENV,
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    text=True,
  )
  deadline = time.time() + 120
  while time.time() < deadline and proc.poll() is None:
    if (tmp_path / "checkpoints" / "2").is_dir():
      break
    time.sleep(0.01)
  proc.send_signal(signal.SIGINT)
  _, err = proc.communicate(timeout=120)
  assert proc.returncode == 130, err[-3000:]
  assert err == "interrupted\n"
