"""How every entry point runs: `cli.run(main)` in place of `app.run(main)`.

absl parses the flags, then `main` runs under one policy:

- logging as `console.configure_logging` sets it;
- an error ends the run with one line on stderr, `error: <message>`, and
  exit status 1: the message names the path, field or flag and what to do
  (a file error names its path and the cause: permission denied, a
  read-only file system, a full disk); `-v 1` adds the traceback;
- Ctrl-C ends it with one line, `interrupted`, and exit status 130, whatever
  it interrupted (a checkpoint save included).

A library function states its error in its message; the entry points add
nothing but this policy (no try/except of their own).
"""

import errno
import sys
import traceback
from collections.abc import Callable
from typing import Any

from absl import app, flags

from qlora_jax.engine import console

FAILED = 1
INTERRUPTED = 130  # 128 + SIGINT, what a shell reports for Ctrl-C
MAX_LINES = 12  # a longer message (a compiler's output) is cut here

# What to do about a file error, by errno.
_HINTS = {
  errno.EACCES: "check its permissions, or choose another path",
  errno.EPERM: "check its permissions, or choose another path",
  errno.EROFS: "a read-only file system: choose a writable path",
  errno.ENOSPC: "the disk is full: free space, or choose another disk",
  errno.EDQUOT: "the disk quota is used up: free space, or choose another disk",
  errno.ENOENT: "check the path",
  errno.ENOTDIR: "a part of the path is a file, not a folder",
  errno.EISDIR: "the path is a folder, not a file",
}
# Errors whose message says all; any other kind is named before it.
_PLAIN = (ValueError, RuntimeError, ArithmeticError, app.UsageError)


def verbose() -> bool:
  """Whether `-v 1` (absl's --verbosity) or more was given."""
  return "verbosity" in flags.FLAGS and flags.FLAGS["verbosity"].value >= 1


def message(e: BaseException) -> str:
  """The one-line report of `e` (at most MAX_LINES lines for a message
  that lists several problems)."""
  if isinstance(e, OSError) and e.filename is not None:
    path = str(e.filename)
    if e.filename2 is not None:
      path += f" -> {e.filename2}"
    text = f"{path}: {e.strerror or type(e).__name__}"
    hint = _HINTS.get(e.errno)
    return f"{text} ({hint})" if hint else text
  text = str(e).strip()
  if isinstance(e, OSError) and e.errno in _HINTS:
    text = f"{e.strerror or text} ({_HINTS[e.errno]})"
  elif not isinstance(e, _PLAIN) or not text:
    text = f"{type(e).__name__}: {text}".rstrip(": ")
    text += " (-v 1 shows the traceback)"
  if isinstance(e, app.UsageError):
    text += " (--help lists the flags)"
  lines = text.splitlines()
  if len(lines) > MAX_LINES:
    cut = len(lines) - MAX_LINES
    lines = lines[:MAX_LINES] + [f"... ({cut} more lines)"]
  return "\n".join(lines)


def _report(line: str, e: BaseException) -> None:
  sys.stdout.flush()
  if verbose():
    traceback.print_exception(e, file=sys.stderr)
  sys.stderr.write(line + "\n")
  sys.stderr.flush()


def guarded(main: Callable[[list[str]], Any], argv: list[str]) -> Any:
  """Runs `main(argv)` under the policy; returns its exit status."""
  console.configure_logging()
  try:
    return main(argv)
  except KeyboardInterrupt as e:
    _report("interrupted", e)
    return INTERRUPTED
  except SystemExit:
    raise
  except Exception as e:  # noqa: BLE001 - the one place errors end a run
    _report(f"error: {message(e)}", e)
    return FAILED


def run(main: Callable[[list[str]], Any]) -> None:
  """`app.run(main)` with the entry-point policy (see the module)."""
  app.run(lambda argv: guarded(main, argv))
