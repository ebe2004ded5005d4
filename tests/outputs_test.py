"""engine.outputs: an output is written whole or not at all, never over an
input, by one writer at a time, with the usual file modes.

Each test fails on a writer that writes in place (the previous output or
a half-written one is then found under the final name).
"""

import os
import pathlib
import signal

import numpy as np
import pytest
import safetensors.numpy

from qlora_jax.engine import outputs


def _tree(folder: pathlib.Path) -> dict[str, str]:
  return {
    str(p.relative_to(folder)): p.read_text()
    for p in sorted(folder.rglob("*"))
    if p.is_file()
  }


def _previous(tmp_path) -> pathlib.Path:
  out = tmp_path / "out"
  with outputs.writing(out, folder=True) as tmp:
    (tmp / "config.json").write_text("old")
    (tmp / "model.safetensors").write_text("old weights")
  return out


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
def test_a_failed_writer_leaves_the_previous_output_and_no_temporary(
  tmp_path, error
):
  out = _previous(tmp_path)
  with pytest.raises(error):
    with outputs.writing(out, folder=True, overwrite=True) as tmp:
      (tmp / "config.json").write_text("new")
      raise error("stopped half way")
  want = {"config.json": "old", "model.safetensors": "old weights"}
  assert _tree(out) == want
  assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_a_swallowed_ctrl_c_still_cancels_the_output(tmp_path):
  out = tmp_path / "model.gguf"
  with pytest.raises(KeyboardInterrupt):
    with outputs.writing(out, folder=False) as tmp:
      try:
        os.kill(os.getpid(), signal.SIGINT)
      except KeyboardInterrupt:
        pass  # as some library's loop or finalizer might
      tmp.write_text("complete, but the user asked to stop")
  assert not list(tmp_path.iterdir())
  assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_an_existing_output_needs_overwrite_and_is_replaced_whole(tmp_path):
  out = _previous(tmp_path)
  with pytest.raises(outputs.OutputError, match="pass --overwrite"):
    with outputs.writing(out, folder=True):
      pytest.fail("entered")
  with outputs.writing(out, folder=True, overwrite=True) as tmp:
    (tmp / "config.json").write_text("new")
  assert _tree(out) == {"config.json": "new"}  # no stale file of the old
  (out / "notes.txt").write_text("mine")
  with pytest.raises(outputs.OutputError, match="holds notes.txt"):
    with outputs.writing(
      out, folder=True, overwrite=True, replaces=lambda n: n != "notes.txt"
    ):
      pytest.fail("entered")
  assert (out / "notes.txt").read_text() == "mine"


def test_kept_off_paths_are_refused_however_spelled(tmp_path):
  run = tmp_path / "run"
  (run / "checkpoints").mkdir(parents=True)
  (tmp_path / "link").symlink_to(run)
  data = tmp_path / "in.jsonl"
  data.write_text("{}\n")
  keep = [("the run's workdir", run), ("the --input file", data)]
  for target in (
    run / "checkpoints" / "999",  # inside
    tmp_path / "link" / "config.json",  # inside, through a symlink
    run / ".." / "run",  # the same folder
    tmp_path,  # holds it
    tmp_path / "x" / ".." / "in.jsonl",  # the input
  ):
    with pytest.raises(outputs.OutputError, match="refusing to write"):
      outputs.check(target, folder=False, overwrite=True, keep_off=keep)
  assert sorted(p.name for p in run.iterdir()) == ["checkpoints"]


def test_a_second_writer_to_the_same_target_is_refused(tmp_path):
  out = tmp_path / "out"
  (tmp_path / "alias").symlink_to(tmp_path)
  with outputs.writing(out, folder=True) as tmp:
    with pytest.raises(outputs.OutputError, match="being written by process"):
      with outputs.writing(tmp_path / "alias" / "out", folder=True):
        pytest.fail("entered")
    (tmp / "config.json").write_text("first")
  assert _tree(out) == {"config.json": "first"}
  assert sorted(p.name for p in tmp_path.iterdir()) == ["alias", "out"]


def test_files_get_the_usual_modes(tmp_path):
  umask = os.umask(0o022)
  try:
    with outputs.writing(tmp_path / "out", folder=True) as tmp:
      # safetensors creates its files 0600
      weights = {"w": np.zeros(3, np.float32)}
      safetensors.numpy.save_file(weights, str(tmp / "model.safetensors"))
  finally:
    os.umask(umask)
  assert (tmp_path / "out").stat().st_mode & 0o777 == 0o755
  mode = (tmp_path / "out" / "model.safetensors").stat().st_mode & 0o777
  assert mode == 0o644


def test_a_killed_writers_leftovers_are_cleared_or_put_back(tmp_path):
  out = tmp_path / "out"
  # Killed while writing: a temporary; killed between the two renames of
  # a replacement: the previous output aside, and nothing under the name.
  (tmp_path / ".out.tmp-123-abcd").mkdir()
  (tmp_path / ".out.tmp-123-abcd" / "config.json").write_text("half")
  (tmp_path / ".out.old-123").mkdir()
  (tmp_path / ".out.old-123" / "config.json").write_text("previous")
  with pytest.raises(outputs.OutputError, match="pass --overwrite"):
    with outputs.writing(out, folder=True):
      pytest.fail("entered")
  assert _tree(out) == {"config.json": "previous"}
  assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
