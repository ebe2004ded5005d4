"""Final outputs written whole or not at all: one way for every writer.

Exports (a folder, a GGUF file, a PEFT adapter), conversions, predictions,
tables and a sweep's files are written through `writing`:

- the target is resolved (symlinks followed) and refused when it is, holds
  or lies inside a path the caller keeps off (its inputs, the run's
  workdir, the base checkpoint), however it is spelled;
- an existing target is refused without `overwrite` (an empty folder
  counts as absent); an overwrite never removes what the writer does not
  write itself (`replaces` names what it does);
- an exclusive lock (`.NAME.lock` beside the target, `flock`) makes a
  second writer to the same target fail at once, by name;
- the writer fills a temporary sibling (`.NAME.tmp-*`); only when it
  returns is the result given the usual modes (0666 / 0777 less the
  umask), synced and renamed into place, the previous output removed after
  the new one is there. On any error, Ctrl-C included, the temporary is
  removed and the previous output is untouched; a Ctrl-C that something
  swallowed still cancels the output and is raised again at the end.
  Leftovers of a killed writer are cleared by the next one.
"""

import contextlib
import fcntl
import os
import pathlib
import secrets
import shutil
import signal
import threading
from collections.abc import Callable, Iterator, Sequence

# (what it is, path), e.g. ("the run's workdir", workdir); None paths skipped.
KeepOff = Sequence[tuple[str, "str | os.PathLike | None"]]


class OutputError(ValueError):
  """An output that may not be written where asked."""


def _inside(a: pathlib.Path, b: pathlib.Path) -> bool:
  return a == b or a.is_relative_to(b)


def check(
  target: str | os.PathLike,
  *,
  folder: bool,
  overwrite: bool = False,
  keep_off: KeepOff = (),
  replaces: Callable[[str], bool] | None = None,
  flag: str = "--out",
) -> pathlib.Path:
  """The resolved target, after the rules above (nothing is written).

  Raises:
    OutputError: naming the flag, the path and what to do.
  """
  out = pathlib.Path(target).expanduser().resolve()
  for what, path in keep_off:
    if path is None:
      continue
    kept = pathlib.Path(path).expanduser().resolve()
    if _inside(out, kept) or _inside(kept, out):
      raise OutputError(
        f"{flag} {target}: refusing to write over or into {what} {path}; "
        "choose a path outside it"
      )
  if not out.exists():
    return out
  if out.is_dir() != folder:
    kind = "a folder" if out.is_dir() else "a file"
    raise OutputError(f"{flag} {target}: exists and is {kind}")
  present = sorted(p.name for p in out.iterdir()) if folder else [out.name]
  if present and not overwrite:
    shown = ", ".join(present[:5]) + ("..." if len(present) > 5 else "")
    shown = f" ({shown})" if folder else ""
    raise OutputError(
      f"{flag} {target}: exists{shown}; pass --overwrite to replace it"
    )
  foreign = [n for n in present if folder and replaces and not replaces(n)]
  if foreign:
    raise OutputError(
      f"{flag} {target}: holds {', '.join(foreign[:5])}, which this output "
      "does not write; --overwrite replaces the whole folder, so move them "
      "or choose another path"
    )
  return out


class Lock:
  """An exclusive lock on a target: `.NAME.lock` beside it, held by flock
  (released by the kernel if the process dies) and removed on release."""

  def __init__(self, target: str | os.PathLike, flag: str = "--out"):
    self.target = pathlib.Path(target)
    self.path = self.target.with_name(f".{self.target.name}.lock")
    self.flag = flag
    self._fd: int | None = None

  def acquire(self) -> None:
    while True:
      fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
      try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
      except BlockingIOError:
        os.close(fd)
        try:
          owner = self.path.read_text().strip() or "another process"
        except OSError:
          owner = "another process"
        raise OutputError(
          f"{self.flag} {self.target}: being written by {owner} (lock "
          f"{self.path}); wait for it to finish, or choose another path"
        ) from None
      try:
        same = os.path.samestat(os.fstat(fd), os.stat(self.path))
      except FileNotFoundError:
        same = False
      if same:  # not a file its last holder had already removed
        break
      os.close(fd)
    os.ftruncate(fd, 0)
    os.write(fd, f"process {os.getpid()}".encode())
    self._fd = fd

  def release(self) -> None:
    if self._fd is not None:
      self.path.unlink(missing_ok=True)
      os.close(self._fd)
      self._fd = None

  def __enter__(self) -> "Lock":
    self.acquire()
    return self

  def __exit__(self, *exc) -> None:
    self.release()


def _usual_modes(root: pathlib.Path) -> None:
  """Files 0666 and folders 0777 less the umask, each file synced."""
  umask = os.umask(0)
  os.umask(umask)
  paths = [root, *root.rglob("*")] if root.is_dir() else [root]
  for p in paths:
    if p.is_symlink():
      continue
    if p.is_dir():
      p.chmod(0o777 & ~umask)
      continue
    p.chmod(0o666 & ~umask)
    fd = os.open(p, os.O_RDONLY)
    try:
      os.fsync(fd)
    finally:
      os.close(fd)


def _remove(path: pathlib.Path) -> None:
  if path.is_dir() and not path.is_symlink():
    shutil.rmtree(path, ignore_errors=True)
  else:
    path.unlink(missing_ok=True)


class _Interrupts:
  """Notes a Ctrl-C (and raises it as usual), so that an interrupt some
  library swallowed still cancels the output."""

  def __init__(self):
    self.seen = False
    self._old = None

  def _handler(self, signum, frame):
    self.seen = True
    signal.default_int_handler(signum, frame)

  def __enter__(self):
    main = threading.current_thread() is threading.main_thread()
    if main and signal.getsignal(signal.SIGINT) is signal.default_int_handler:
      self._old = signal.signal(signal.SIGINT, self._handler)
    return self

  def __exit__(self, *exc):
    if self._old is not None:
      signal.signal(signal.SIGINT, self._old)


@contextlib.contextmanager
def writing(
  target: str | os.PathLike,
  *,
  folder: bool,
  overwrite: bool = False,
  keep_off: KeepOff = (),
  replaces: Callable[[str], bool] | None = None,
  flag: str = "--out",
) -> Iterator[pathlib.Path]:
  """Yields where to write `target`: a new empty folder, or a file path in
  a temporary folder; moves it into place when the block returns.

  Raises:
    OutputError: as `check`; another writer holds the target; the parent
      folder cannot be written; the block wrote nothing.
    KeyboardInterrupt: a Ctrl-C during the block, even a swallowed one.
  """
  rules = dict(
    folder=folder, overwrite=overwrite, keep_off=keep_off, replaces=replaces
  )
  out = check(target, flag=flag, **rules)
  lock = Lock(out, flag)
  tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
  try:
    out.parent.mkdir(parents=True, exist_ok=True)
    lock.acquire()
  except OSError as e:
    raise OutputError(f"{flag} {target}: cannot write there ({e})") from None
  try:
    _clear_leftovers(out)
    check(target, flag=flag, **rules)  # again, under the lock
    tmp.mkdir()
    with _Interrupts() as interrupts:
      yield tmp if folder else tmp / out.name
      written = tmp if folder else tmp / out.name
      if not written.exists():
        raise OutputError(f"{flag} {target}: the writer wrote nothing")
      if interrupts.seen:
        raise KeyboardInterrupt
      _usual_modes(written)
      _move_into_place(written, out)
  finally:
    _remove(tmp)
    lock.release()


def _clear_leftovers(out: pathlib.Path) -> None:
  """Removes a killed writer's temporaries; puts back a previous output a
  kill left aside between the two renames of `_move_into_place`."""
  for p in out.parent.iterdir():
    if p.name.startswith(f".{out.name}.tmp-"):
      _remove(p)
    elif p.name.startswith(f".{out.name}.old-"):
      if out.exists():
        _remove(p)
      else:
        p.rename(out)


def _move_into_place(new: pathlib.Path, out: pathlib.Path) -> None:
  if not new.is_dir() or not out.exists() or not any(out.iterdir()):
    os.replace(new, out)  # a file, or a folder over nothing / an empty one
  else:
    old = out.with_name(f".{out.name}.old-{os.getpid()}")
    out.rename(old)
    try:
      new.rename(out)
    except BaseException:
      old.rename(out)
      raise
    _remove(old)
  fd = os.open(out.parent, os.O_RDONLY)
  try:
    os.fsync(fd)
  finally:
    os.close(fd)


def write_text(
  path: str | os.PathLike,
  text: str,
  *,
  overwrite: bool = True,
  keep_off: KeepOff = (),
  flag: str = "--out",
) -> pathlib.Path:
  """`text` as the file `path`, through `writing`."""
  with writing(
    path, folder=False, overwrite=overwrite, keep_off=keep_off, flag=flag
  ) as tmp:
    tmp.write_text(text)
  return pathlib.Path(path)
