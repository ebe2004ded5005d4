"""A time and size budget for rendering a chat template.

A chat template comes with a checkpoint, so a careless or hostile one must
neither hang a run nor fill its memory. Jinja's sandbox stops escapes and
caps one `range` at 100,000 items, but two nested ranges still loop 10^10
times. Here a rendering:

- runs under a deadline (`MAX_SECONDS`): once it has run that long, a
  watchdog thread interrupts it at its next Python step and it raises
  `BudgetError` (one long step in C, say a huge `format`, is seen only
  when it returns);
- streams its output and stops it past `MAX_CHARS` characters;
- refuses a `*` that would build a string or list over `MAX_CHARS` items
  and a `**` of more than `MAX_POWER_BITS` bits, before computing them.

A rendering of a usual template takes well under a millisecond.
"""

import ctypes
import itertools
import math
import threading
import time
from collections.abc import Mapping
from typing import Any

import jinja2
from jinja2 import sandbox

MAX_SECONDS = 5.0
MAX_CHARS = 10_000_000
MAX_POWER_BITS = 100_000
POLL = 0.25  # seconds between the watchdog's looks at the clock


class BudgetError(Exception):
  """A rendering that ran out of time or grew past its size."""


class _Overtime(BaseException):
  """Raised in a rendering thread by the watchdog (a BaseException, so no
  `except Exception` in between swallows it)."""


class Environment(sandbox.ImmutableSandboxedEnvironment):
  """The sandbox with `*` and `**` checked before they compute."""

  intercepted_binops = frozenset({"*", "**"})

  def call_binop(self, context, operator: str, left: Any, right: Any) -> Any:
    if operator == "*":
      for seq, n in ((left, right), (right, left)):
        if isinstance(seq, str | list | tuple) and isinstance(n, int):
          if len(seq) * n > MAX_CHARS:
            raise BudgetError(
              f"'*' would build {len(seq) * n:,} items, over {MAX_CHARS:,}"
            )
    if (
      operator == "**"
      and isinstance(left, int)
      and isinstance(right, int)
      and abs(left) > 1
      and right * math.log2(abs(left)) > MAX_POWER_BITS
    ):
      raise BudgetError(
        f"'**' would build a number of over {MAX_POWER_BITS:,} bits"
      )
    return super().call_binop(context, operator, left, right)


class _Watchdog:
  """Raises `_Overtime` in each watched thread that passes its deadline.

  Its thread runs only while something is watched (it looks every POLL
  seconds), so a deadline fires up to POLL seconds late.
  """

  def __init__(self):
    self._lock = threading.Lock()
    self._due: dict[int, tuple[float, int]] = {}  # token: (deadline, thread)
    self._fired: set[int] = set()
    self._tokens = itertools.count()
    self._running = False

  def start(self, seconds: float) -> int:
    with self._lock:
      token = next(self._tokens)
      self._due[token] = (time.monotonic() + seconds, threading.get_ident())
      if not self._running:
        self._running = True
        threading.Thread(
          target=self._run, name="template-deadline", daemon=True
        ).start()
    return token

  def stop(self, token: int) -> bool:
    """Ends the watch of `token`; whether its deadline fired. An
    `_Overtime` still pending in this thread is cleared."""
    with self._lock:
      self._due.pop(token, None)
      fired = token in self._fired
      self._fired.discard(token)
      if fired:
        _async_raise(threading.get_ident(), None)
    return fired

  def _run(self) -> None:
    while True:
      time.sleep(POLL)
      with self._lock:
        now = time.monotonic()
        for token, (deadline, thread) in list(self._due.items()):
          if deadline <= now:
            del self._due[token]
            self._fired.add(token)
            _async_raise(thread, _Overtime)
        if not self._due:
          self._running = False
          return


def _async_raise(thread: int, exc: type[BaseException] | None) -> None:
  """Raises `exc` in `thread` at its next Python step (None: clears one
  not yet raised)."""
  arg = None if exc is None else ctypes.py_object(exc)
  ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(thread), arg)


_WATCHDOG = _Watchdog()


def render(
  template: jinja2.Template,
  variables: Mapping[str, Any],
  seconds: float | None = None,
  chars: int | None = None,
) -> str:
  """`template` rendered with `variables` within `seconds` and `chars`
  (default MAX_SECONDS and MAX_CHARS).

  Raises:
    BudgetError: the rendering ran out of time or output.
  """
  seconds = MAX_SECONDS if seconds is None else seconds
  chars = MAX_CHARS if chars is None else chars
  parts, size = [], 0
  token = _WATCHDOG.start(seconds)
  try:
    try:
      for piece in template.generate(**variables):
        size += len(piece)
        if size > chars:
          raise BudgetError(f"its output passed {chars:,} characters")
        parts.append(piece)
    finally:
      fired = _WATCHDOG.stop(token)
  except _Overtime:
    _WATCHDOG.stop(token)
    fired = True
  if fired:
    raise BudgetError(f"it ran for more than {seconds:g} s")
  return "".join(parts)
