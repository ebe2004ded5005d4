"""train_and_evaluate end to end on the tiny BERT fixture (CPU)."""

import json
import os
import pathlib
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from qlora_jax import nn as qnn
from qlora_jax.engine import divergence, train
from qlora_jax.engine.checkpoint import Checkpoints
from qlora_jax.engine.metrics import read_metrics
from tests import kill_resume, tiny_config

ROOT = pathlib.Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  folder = tmp_path_factory.mktemp("data")
  tiny_config.write_dataset(folder)
  return folder


def _run_cli(workdir, data_dir, *overrides, env=None, wait=True):
  cmd = [
    sys.executable,
    "-m",
    "experiments.train",
    f"--config=tests/tiny_config.py:{data_dir}",
    f"--workdir={workdir}",
    *overrides,
  ]
  full_env = dict(os.environ, JAX_PLATFORMS="cpu", **(env or {}))
  proc = subprocess.Popen(
    cmd,
    cwd=ROOT,
    env=full_env,
    stdout=subprocess.PIPE,
    stderr=subprocess.STDOUT,
    text=True,
  )
  if not wait:
    return proc
  out, _ = proc.communicate(timeout=600)
  assert proc.returncode == 0, out[-3000:]
  return out


@pytest.fixture(scope="module")
def one_device_run(data_dir, tmp_path_factory):
  """The tiny run on one CPU device, in this process: (workdir, final
  metrics). The reference of the runs on eight devices and two processes."""
  workdir = tmp_path_factory.mktemp("one")
  config = tiny_config.get_config(str(data_dir))
  config.mesh.data = 1
  config.mesh.fsdp = 1
  final = train.train_and_evaluate(config, str(workdir))
  return workdir, final


def _losses(workdir, kind="train"):
  return {
    r["step"]: r
    for r in read_metrics(pathlib.Path(workdir) / "metrics.jsonl")
    if r["kind"] == kind
  }


def test_run_trains_adapters_only_and_writes_everything(one_device_run):
  workdir, final = one_device_run
  for name in (
    "config.json",
    "labels.json",
    "metrics.jsonl",
    "curves.png",
    "predictions.jsonl",
    "final_metrics.json",
  ):
    assert (workdir / name).is_file(), name
  assert list((workdir / "tensorboard").iterdir())
  evals = _losses(workdir, "eval")
  assert sorted(evals) == [6, 12]
  # The task is learnable: the loss falls below log(2) = 0.693 (chance).
  assert evals[12]["loss"] < 0.6 and final["loss"] == evals[12]["loss"]
  assert final["accuracy"] == evals[12]["accuracy"]
  predictions = [
    json.loads(line)
    for line in (workdir / "predictions.jsonl").read_text().splitlines()
  ]
  assert len(predictions) == 16
  right = sum(p["label"] == p["predicted"] for p in predictions)
  assert right / 16 == pytest.approx(final["accuracy"])
  # The checkpoint holds adapters and the new head only, never the base.
  ckpt = Checkpoints(workdir, keep=2)
  assert ckpt.all_steps() == [6, 12]
  restored, meta = ckpt.read(12)
  assert meta["step"] == 12 and meta["label_map"] == {"first": 0, "second": 1}
  names = {p[-1] for p in qnn.flatten(restored["params"])}
  assert names == {"lora_a", "lora_b", "kernel", "bias"}
  kernels = [p for p in qnn.flatten(restored["params"]) if p[-1] == "kernel"]
  assert [p[1] for p in kernels] == ["classifier"]
  n_train = qnn.num_params(restored["params"])
  mu = [
    leaf
    for path, leaf in jax.tree_util.tree_leaves_with_path(restored["opt_state"])
    if "mu" in jax.tree_util.keystr(path)
  ]
  assert sum(int(np.prod(m.shape)) for m in mu) == n_train


def test_sigkill_then_resume_is_bit_identical(
  data_dir, tmp_path, one_device_run
):
  # The one-device run on the command line, checkpointing at every step,
  # killed after a checkpoint and resumed here: the same numbers, step for
  # step, as the straight run.
  one, _ = one_device_run
  killed = tmp_path / "killed"
  overrides = [
    "--config.mesh.data=1",
    "--config.mesh.fsdp=1",
    "--config.train.checkpoint_every=1",
  ]
  proc = _run_cli(killed, data_dir, *overrides, wait=False)
  resumed_from = kill_resume.kill_after_checkpoint(proc, killed, 2)
  assert 2 <= resumed_from < 12
  config = tiny_config.get_config(str(data_dir))
  config.mesh.data = 1
  config.mesh.fsdp = 1
  config.train.checkpoint_every = 1
  train.train_and_evaluate(config, str(killed))
  a, b = _losses(one), _losses(killed)
  assert sorted(a) == sorted(b) == list(range(1, 13))
  for step in a:
    assert a[step]["loss"] == b[step]["loss"], step
    assert a[step]["grad_norm"] == b[step]["grad_norm"], step
  ea, eb = _losses(one, "eval"), _losses(killed, "eval")
  assert ea == eb


def test_eight_devices_match_one(data_dir, tmp_path, one_device_run):
  one, _ = one_device_run
  eight = tmp_path / "eight"
  _run_cli(
    eight,
    data_dir,
    "--config.mesh.data=4",
    "--config.mesh.fsdp=2",
    # The test session's flags (tests/conftest.py) and eight devices.
    env={
      "XLA_FLAGS": os.environ["XLA_FLAGS"]
      + " --xla_force_host_platform_device_count=8"
    },
  )
  a, b = _losses(one), _losses(eight)
  assert sorted(a) == sorted(b)
  for step in a:
    # Same math, other reduction orders: 1e-5 relative.
    assert b[step]["loss"] == pytest.approx(a[step]["loss"], rel=1e-5)


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def test_two_processes_match_one(data_dir, tmp_path, one_device_run):
  one, _ = one_device_run
  two = tmp_path / "two"
  port = _free_port()
  procs = [
    _run_cli(
      two,
      data_dir,
      "--config.distributed.enabled=True",
      f"--config.distributed.coordinator_address=localhost:{port}",
      "--config.distributed.num_processes=2",
      f"--config.distributed.process_id={i}",
      "--config.distributed.cpu_collectives=gloo",
      wait=False,
    )
    for i in range(2)
  ]
  outs = [p.communicate(timeout=600)[0] for p in procs]
  for p, out in zip(procs, outs, strict=True):
    assert p.returncode == 0, out[-3000:]
  a, b = _losses(one), _losses(two)
  assert sorted(a) == sorted(b)
  for step in a:
    assert b[step]["loss"] == pytest.approx(a[step]["loss"], rel=1e-5)
  assert _losses(one, "eval")[12]["accuracy"] == pytest.approx(
    _losses(two, "eval")[12]["accuracy"]
  )


@pytest.mark.parametrize("learning_rate", [1e6, 1e30])
def test_a_diverging_run_stops_at_its_first_step_and_saves_nothing(
  data_dir, tmp_path, learning_rate
):
  # lr 1e6 collapses the model, lr 1e30 sends its weights to 1e30: both
  # from the first update, which is then 1e5 times the weights or more.
  config = tiny_config.get_config(str(data_dir))
  config.opt.learning_rate = learning_rate
  config.opt.max_grad_norm = 0.0
  config.opt.warmup_ratio = 0.0
  config.opt.schedule = "constant"
  config.train.checkpoint_every = 1
  with pytest.raises(divergence.DivergenceError) as err:
    train.train_and_evaluate(config, str(tmp_path))
  message = str(err.value)
  assert message.startswith("training stopped at step 1: the update norm ")
  assert "None" not in message and "\n" not in message
  assert f"no checkpoint in {tmp_path / 'checkpoints'} is good" in message
  assert Checkpoints(tmp_path, keep=2).all_steps() == []
