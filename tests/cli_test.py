"""The entry-point policy (`engine.cli`): an error is one line with exit
status 1, the traceback only with -v 1; Ctrl-C is one line and 130.

The real scripts run it in tests/reliability_test.py; here `guarded` runs
stand-in mains in this process.
"""

import errno

import pytest
from absl import app, flags

from qlora_jax.engine import cli


def _fail(e: BaseException):
  def main(argv):
    del argv
    raise e

  return main


@pytest.fixture
def verbosity():
  """Sets absl's -v for one test, as if given; puts it back after."""
  flag = flags.FLAGS["verbosity"]
  before = flag.value, flag.present

  def set_to(level: int) -> None:
    flag.value, flag.present = level, 1

  yield set_to
  flag.value, flag.present = before


def test_an_error_is_one_line_and_exit_status_1(capsys, verbosity):
  verbosity(0)
  bad = ValueError('data/train.jsonl:3: missing field "prompt"')
  assert cli.guarded(_fail(bad), []) == cli.FAILED
  err = capsys.readouterr().err
  assert err == 'error: data/train.jsonl:3: missing field "prompt"\n'
  # -v 1: the traceback first, the same line last.
  verbosity(1)
  assert cli.guarded(_fail(bad), []) == cli.FAILED
  err = capsys.readouterr().err
  assert err.startswith("Traceback (most recent call last):")
  assert err.endswith('error: data/train.jsonl:3: missing field "prompt"\n')


def test_ctrl_c_is_one_line_and_exit_status_130(capsys, verbosity):
  verbosity(0)
  assert cli.guarded(_fail(KeyboardInterrupt()), []) == 130
  assert capsys.readouterr().err == "interrupted\n"


@pytest.mark.parametrize(
  "code,strerror,hint",
  [
    (errno.EACCES, "Permission denied", "check its permissions"),
    (errno.EROFS, "Read-only file system", "a read-only file system"),
    (errno.ENOSPC, "No space left on device", "the disk is full"),
  ],
)
def test_file_errors_name_path_cause_and_remedy(code, strerror, hint, capsys):
  e = OSError(code, strerror, "/runs/a/config.json")
  assert cli.guarded(_fail(e), []) == cli.FAILED
  err = capsys.readouterr().err
  assert err.count("\n") == 1, err
  assert err.startswith(f"error: /runs/a/config.json: {strerror} ({hint}")
  # Without a path (a write cut short), the cause and remedy still.
  assert cli.message(OSError(code, strerror)).startswith(f"{strerror} ({hint}")


def test_other_errors_are_named_and_usage_errors_point_to_help():
  assert cli.message(KeyError("lora")) == (
    "KeyError: 'lora' (-v 1 shows the traceback)"
  )
  assert cli.message(app.UsageError("--input needs --out")) == (
    "--input needs --out (--help lists the flags)"
  )
  long = RuntimeError("\n".join(f"line {i}" for i in range(40)))
  lines = cli.message(long).splitlines()
  assert len(lines) == cli.MAX_LINES + 1
  assert lines[-1] == f"... ({40 - cli.MAX_LINES} more lines)"


def test_exit_statuses_pass_through():
  def main(argv):
    del argv
    raise SystemExit(3)

  with pytest.raises(SystemExit) as e:
    cli.guarded(main, [])
  assert e.value.code == 3
  assert cli.guarded(lambda argv: None, []) is None
