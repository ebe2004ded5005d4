"""Bad input is refused early and by name; a run's outputs are never lost.

Each case is what a careless user does: the error must name the config
field, file or tensor, and the workdir must be byte for byte what it was
(hashed before and after). Runs use the tiny BERT classifier.
"""

import contextlib
import errno
import hashlib
import json
import logging
import os
import pathlib
import shutil
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from configs import default
from qlora_jax import data, models
from qlora_jax import nn as qnn
from qlora_jax.engine import answers, export, train
from qlora_jax.engine.checkpoint import Checkpoints, CheckpointWriteError
from qlora_jax.engine.metrics import read_metrics
from qlora_jax.engine.settings import ConfigError, Settings
from qlora_jax.engine.workdir import LOCK, WorkdirError, write_atomic
from qlora_jax.models.gguf_header import GGUFFile
from tests import tiny_config

ROOT = pathlib.Path(__file__).resolve().parent.parent
BERT = ROOT / "tests/data/hf/bert"


def _hash(folder: pathlib.Path) -> dict[str, str]:
  return {
    str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
    for p in sorted(folder.rglob("*"))
    if p.is_file()
  }


def _config(data_dir, steps=4):
  c = tiny_config.get_config(str(data_dir))
  c.train.steps = steps
  c.train.eval_every = 2
  return c


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  folder = tmp_path_factory.mktemp("data")
  tiny_config.write_dataset(folder, n_train=16, n_eval=8)
  return folder


@pytest.fixture(scope="module")
def finished(data_dir, tmp_path_factory):
  """A finished 4-step run with checkpoints at steps 2 and 4."""
  workdir = tmp_path_factory.mktemp("finished")
  train.train_and_evaluate(_config(data_dir), str(workdir))
  return workdir


def _copy(finished, tmp_path) -> pathlib.Path:
  out = tmp_path / "run"
  shutil.copytree(finished, out)
  return out


def test_config_errors_name_every_bad_field_at_once():
  # A mapping from a JSON file or a script (a ConfigDict would refuse some
  # of these types itself).
  c = default.get_config().to_dict()
  c["train"]["keep_checkpoints"] = 0
  c["lora"]["rank"] = 8.5
  c["quant"]["block_size"] = "64"
  c["opt"]["eps"] = -1.0
  c["train"]["grad_accum"] = 3  # 32 is not a multiple of 3
  c["data"]["max_length"] = 0
  c["model"]["embed_dtype"] = "bf16"
  with pytest.raises(ConfigError) as e:
    Settings.from_config(c)
  message = str(e.value)
  for field in (
    "train.keep_checkpoints",
    "lora.rank: expected a whole number, got 8.5",
    "quant.block_size: expected int, got str '64'",
    "opt.eps",
    "train.batch_size",
    "data.max_length",
    "model.embed_dtype: unknown value 'bf16'",
  ):
    assert field in message, (field, message)
  # Unknown and missing fields are named too.
  raw = default.get_config().to_dict()
  raw["quant"]["data_typ"] = "nf4"
  del raw["lora"]["alpha"]
  with pytest.raises(ConfigError, match=r"quant\.data_typ: unknown") as e:
    Settings.from_config(raw)
  assert "lora.alpha: missing" in str(e.value)


def test_library_refuses_unknown_keys_and_fractional_ranks():
  paths = ["a/q", "a/v"]
  with pytest.raises(ValueError, match="data_typ"):
    qnn.make_plan(paths, None, {"data_typ": "nf4"})  # was: a float base
  with pytest.raises(ValueError, match="whole number, got 8.5"):
    qnn.make_plan(paths, {"rank": 8.5}, None)  # was: truncated to 8
  with pytest.raises(TypeError, match="unknown model option.*lroa"):
    models.model_options(lroa={"rank": 4})


def test_keep_checkpoints_zero_is_refused_on_the_command_line(tmp_path):
  workdir = tmp_path / "run"
  proc = subprocess.run(
    [
      sys.executable,
      "-m",
      "experiments.train",
      "--config.train.keep_checkpoints=0",
      f"--workdir={workdir}",
    ],
    cwd=ROOT,
    capture_output=True,
    text=True,
    check=False,
  )
  assert proc.returncode == 1
  assert "train.keep_checkpoints: must be >= 1, got 0" in proc.stderr
  assert "Traceback" not in proc.stderr
  assert not workdir.exists()  # refused before anything was written


@pytest.mark.parametrize(
  "field,value",
  [("lora.rank", 2), ("quant.data_type", "int2"), ("train.steps", 6)],
)
def test_a_rerun_with_another_config_is_refused(
  finished, data_dir, tmp_path, field, value
):
  workdir = _copy(finished, tmp_path)
  before = _hash(workdir)
  c = _config(data_dir)
  section, name = field.split(".")
  c[section][name] = value
  with pytest.raises(WorkdirError, match=field.replace(".", r"\.")):
    train.train_and_evaluate(c, str(workdir))
  assert _hash(workdir) == before


def test_a_live_lock_is_refused(finished, data_dir, tmp_path):
  workdir = _copy(finished, tmp_path)
  (workdir / LOCK).write_text(
    json.dumps({"pid": os.getpid(), "host": socket.gethostname()})
  )
  before = _hash(workdir)
  with pytest.raises(WorkdirError, match=f"in use by process {os.getpid()}"):
    train.train_and_evaluate(_config(data_dir), str(workdir))
  assert _hash(workdir) == before


def test_resume_survives_a_stale_lock_a_torn_line_and_a_bad_checkpoint(
  finished, data_dir, tmp_path, capsys
):
  workdir = _copy(finished, tmp_path)
  gone = subprocess.Popen(["true"])
  gone.wait()  # its pid no longer runs: the lock of a killed run
  (workdir / LOCK).write_text(
    json.dumps({"pid": gone.pid, "host": socket.gethostname()})
  )
  with (workdir / "metrics.jsonl").open("a") as f:
    f.write('{"kind": "train", "st')  # killed mid-write
  newest = workdir / "checkpoints" / "4"
  for p in newest.rglob("*"):
    if p.is_file() and p.stat().st_size > 0:
      p.write_bytes(b"\0" * p.stat().st_size)  # a damaged disk
  final = train.train_and_evaluate(
    _config(data_dir, steps=6), str(workdir), allow_safe_changes=True
  )
  out = capsys.readouterr().out
  assert f"checkpoint {newest} does not read" in out
  assert "resumed from     step 2" in out
  assert not (workdir / LOCK).exists()  # released at the end
  records = read_metrics(workdir / "metrics.jsonl")  # the torn line is gone
  assert max(r["step"] for r in records) == 6
  lines = (workdir / "metrics.jsonl").read_text().splitlines()
  logged = [(r["kind"], r["step"]) for r in map(json.loads, lines)]
  assert len(logged) == len(set(logged))  # steps 3 and 4, redone, once
  written = json.loads((workdir / "final_metrics.json").read_text())
  assert all(written[k] == v for k, v in final.items())


def test_exports_never_clobber(finished, tmp_path):
  out = tmp_path / "export"
  out.mkdir()
  (out / "model.safetensors.index.json").write_text("{}")  # a stale index
  (out / "notes.txt").write_text("mine")
  with pytest.raises(ValueError, match="pass --overwrite"):
    export.export_merged(finished, out)
  # An overwrite replaces the folder whole: not over a file of the user's.
  with pytest.raises(ValueError, match="holds notes.txt"):
    export.export_merged(finished, out, overwrite=True)
  assert (out / "model.safetensors.index.json").read_text() == "{}"
  (out / "notes.txt").unlink()
  export.export_merged(finished, out, overwrite=True)
  assert not (out / "model.safetensors.index.json").exists()
  assert (out / "model.safetensors").is_file()
  before = _hash(finished)
  with pytest.raises(ValueError, match="run's workdir"):
    export.export_adapter(finished, finished, overwrite=True)
  with pytest.raises(ValueError, match="the base checkpoint"):
    export.export_merged(finished, BERT, overwrite=True)
  with pytest.raises(ValueError, match="run's workdir"):
    export.export_merged(finished, finished.parent, overwrite=True)
  assert _hash(finished) == before


def test_checkpoint_headers_are_checked_like_tensors(tmp_path):
  bad = tmp_path / "bert"
  shutil.copytree(BERT, bad)
  raw = json.loads((bad / "config.json").read_text())
  raw["layer_norm_eps"] = -1e-12
  (bad / "config.json").write_text(json.dumps(raw))
  with pytest.raises(models.ConfigError, match="'layer_norm_eps' must be pos"):
    models.from_pretrained(bad, task="embedding")
  (bad / "config.json").write_text((BERT / "config.json").read_text())
  tensors = load_file(str(bad / "model.safetensors"))
  key = next(k for k in tensors if k.endswith("query.weight"))
  tensors[key] = tensors[key].astype(np.int32)
  save_file(tensors, str(bad / "model.safetensors"))
  with pytest.raises(models.CheckpointError, match=f"{key}.*int32"):
    models.from_pretrained(bad, task="embedding")


def test_files_and_lengths_are_checked_before_loading(data_dir, tmp_path):
  c = _config(data_dir)
  c.data.eval_path = str(tmp_path / "missing.jsonl")
  with pytest.raises(ValueError, match="data.eval_path: no file"):
    train.train_and_evaluate(c, str(tmp_path / "a"))
  c = _config(data_dir)
  c.data.max_length = 65  # the fixture's BERT has 64 positions
  with pytest.raises(ValueError, match="data.max_length 65 exceeds the 64"):
    train.train_and_evaluate(c, str(tmp_path / "b"))
  assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_recorded_paths_are_absolute(finished):
  recorded = json.loads((finished / "config.json").read_text())
  for value in (
    recorded["model"]["checkpoint"],
    recorded["data"]["train_path"],
    recorded["data"]["eval_path"],
  ):
    assert pathlib.Path(value).is_absolute(), value
  s = Settings.from_config(recorded)
  assert s.to_dict() == recorded


@contextlib.contextmanager
def _unwritable(folder: pathlib.Path):
  """`folder` refuses new entries, root's processes included (chattr +i
  where chmod does not bind); skips where neither is possible."""
  if os.geteuid() != 0:
    folder.chmod(0o555)
    undo = ["chmod", "755", str(folder)]
  elif subprocess.run(["chattr", "+i", str(folder)], check=False).returncode:
    pytest.skip("no way to make a folder unwritable for root here")
  else:
    undo = ["chattr", "-i", str(folder)]
  try:
    with pytest.raises(OSError):
      (folder / "probe").mkdir()
    yield
  finally:
    subprocess.run(undo, check=True)


def _idle_pool_worker(thread: threading.Thread) -> bool:
  """Whether `thread` is a `concurrent.futures` worker waiting for work:
  its innermost Python frame is the pool's `_worker` loop, blocked on its
  queue (a worker running a task is deeper, in the task)."""
  frame = sys._current_frames().get(thread.ident)
  return (
    frame is not None
    and frame.f_code.co_name == "_worker"
    and frame.f_code.co_filename.endswith(
      os.path.join("concurrent", "futures", "thread.py")
    )
  )


def test_a_checkpoint_that_cannot_be_written_ends_the_run(finished, tmp_path):
  # A finished run rerun with more steps, its checkpoints/ not writable:
  # was a PermissionError, then a process that never exited (orbax's
  # threads waiting 300 s each for the step's folder). The loop saves
  # through `Checkpoints.save`, as here.
  workdir = _copy(finished, tmp_path)
  checkpoints = Checkpoints(workdir, keep=3)
  state, meta = checkpoints.read(4)
  threads = set(threading.enumerate())
  with (
    _unwritable(workdir / "checkpoints"),
    pytest.raises(CheckpointWriteError) as e,
  ):
    checkpoints.save(6, state, meta)
  assert str(e.value).startswith(
    f"checkpoint 6 could not be written to {workdir / 'checkpoints'} "
    "(PermissionError: "
  )
  # Nothing keeps the process from exiting: every thread the save started
  # has ended, or is an idle worker of a thread pool (asyncio's default
  # executor among them), which Python's exit hook wakes and joins.
  new = set(threading.enumerate()) - threads
  left = [t for t in new if t.is_alive() and not t.daemon]
  for _ in range(50):  # up to 5 s for busy threads to finish
    left = [t for t in left if t.is_alive() and not _idle_pool_worker(t)]
    if not left:
      break
    time.sleep(0.1)
  assert not left, left
  assert checkpoints.all_steps() == [2, 4]


def test_a_gguf_token_list_cut_short_is_named():
  # The merges name tokens that a cut list no longer holds: was a bare
  # tokenizers "Token `lo` out of vocabulary" exception.
  tokens = ["l", "o", "w", "lo", "low"]
  merges = ["l o", "lo w"]
  path = pathlib.Path("/models/cut.gguf")
  meta = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.merges": merges}
  whole = GGUFFile(path, {**meta, "tokenizer.ggml.tokens": tokens}, {})
  assert models.gguf_tokenizer(whole).tokenizer.encode("low").ids == [4]
  cut = GGUFFile(path, {**meta, "tokenizer.ggml.tokens": tokens[:3]}, {})
  with pytest.raises(models.CheckpointError) as e:
    models.gguf_tokenizer(cut)
  assert str(e.value).startswith(
    f"{path}: metadata key 'tokenizer.ggml.merges' entry 0 (l o) needs the "
    "token 'lo', which is not among the 3 tokens of 'tokenizer.ggml.tokens' "
    "(out of vocabulary)"
  )


def test_eval_prompts_longer_than_max_length_keep_their_end(caplog):
  # Answers generated at evaluation: a prompt over data.max_length keeps
  # its last tokens (the question's end and the turn), and says so at
  # info level (the run's own configured cut: a default run does not warn).
  tok = data.Tokenizer.from_folder(ROOT / "tests/data/hf/llama_gqa")
  long = " ".join(tiny_config.FIRST * 4)
  examples = [
    data.InstructionExample(long, "of", "eval.jsonl:1"),
    data.InstructionExample("the", "of", "eval.jsonl:2"),
  ]
  full = data.prompt_and_answer(examples[0], tok)[0]
  assert len(full) > 16
  with caplog.at_level(logging.INFO):
    prompts = answers.make_prompts(examples, tok, max_length=16)
  assert all(r.levelno == logging.INFO for r in caplog.records)
  assert prompts.ids[0].tolist() == full[-16:]
  assert (
    "1 eval prompt(s) longer than data.max_length (16 tokens; the longest "
    f"has {len(full)})" in caplog.text
  )


@pytest.fixture
def full_disk(tmp_path):
  """A file system with no space left (an 8 KB tmpfs, filled); skips where
  mounting one is not allowed."""
  disk = tmp_path / "disk"
  disk.mkdir()
  mount = ["mount", "-t", "tmpfs", "-o", "size=8k", "tmpfs", str(disk)]
  if subprocess.run(mount, capture_output=True, check=False).returncode:
    pytest.skip("no permission to mount a small file system here")
  try:
    with pytest.raises(OSError), (disk / "filler").open("wb") as f:
      f.write(b"\0" * 16384)
    yield disk
  finally:
    subprocess.run(["umount", str(disk)], check=True)


def test_a_full_disk_at_start_names_the_file(data_dir, full_disk):
  # A write to a full disk raises an OSError without a path: was "error:
  # [Errno 28] No space left on device" and a traceback.
  workdir = full_disk / "run"
  with pytest.raises(OSError) as e:
    train.train_and_evaluate(_config(data_dir), str(workdir))
  assert e.value.errno == errno.ENOSPC
  assert e.value.filename == str(workdir / LOCK)
  assert not (workdir / LOCK).exists()  # no empty lock left behind


def test_an_atomic_write_that_fails_names_its_file(tmp_path):
  target = tmp_path / "config.json"
  # The temporary it writes first is where the disk is full.
  (tmp_path / f".config.json.{os.getpid()}.tmp").symlink_to("/dev/full")
  with pytest.raises(OSError) as e:
    write_atomic(target, "{}")
  assert (e.value.errno, e.value.filename) == (errno.ENOSPC, str(target))
  assert list(tmp_path.iterdir()) == []  # the temporary is gone
