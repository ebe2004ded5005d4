"""Chat templates: a checkpoint's Jinja template rendered as transformers
renders it (`apply_chat_template(..., tokenize=False)`).

The environment is the one transformers builds: sandboxed, `trim_blocks`
and `lstrip_blocks`, the `raise_exception` and `strftime_now` functions,
`tojson` keeping non-ASCII text, and the special tokens as variables.
"""

import datetime
import functools
import json
from collections.abc import Mapping, Sequence
from typing import Any

import jinja2
from jinja2 import sandbox

ROLES = ("system", "user", "assistant", "tool")


class TemplateError(ValueError):
  """A chat template that does not render, or a malformed conversation."""


def _raise(message: str):
  raise TemplateError(f"the chat template raised: {message}")


def _tojson(value, indent=None, separators=None, sort_keys=False):
  return json.dumps(
    value,
    indent=indent,
    separators=separators,
    sort_keys=sort_keys,
    ensure_ascii=False,
  )


@functools.lru_cache(maxsize=16)
def _compile(template: str) -> jinja2.Template:
  env = sandbox.ImmutableSandboxedEnvironment(
    trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
  )
  env.filters["tojson"] = _tojson
  env.globals["raise_exception"] = _raise
  env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(
    fmt
  )
  try:
    return env.from_string(template)
  except jinja2.TemplateError as e:
    raise TemplateError(f"the chat template does not compile: {e}") from e


def check_messages(messages: Sequence[Mapping[str, Any]], where: str) -> None:
  """Each message a mapping with a known `role` and a string `content`."""
  if not isinstance(messages, Sequence) or not messages:
    raise TemplateError(f"{where}: 'messages' must be a non-empty list")
  for i, m in enumerate(messages):
    if not isinstance(m, Mapping):
      raise TemplateError(f"{where}: message {i} is not an object")
    if m.get("role") not in ROLES:
      raise TemplateError(
        f"{where}: message {i} has role {m.get('role')!r}, expected one of "
        f"{ROLES}"
      )
    if not isinstance(m.get("content"), str):
      raise TemplateError(f"{where}: message {i} has no string 'content'")


def render(
  template: str,
  messages: Sequence[Mapping[str, Any]],
  add_generation_prompt: bool = False,
  special_tokens: Mapping[str, str] | None = None,
) -> str:
  """The conversation as text, ready to tokenize without special tokens."""
  check_messages(messages, "chat")
  try:
    return _compile(template).render(
      messages=[dict(m) for m in messages],
      add_generation_prompt=add_generation_prompt,
      **dict(special_tokens or {}),
    )
  except TemplateError:
    raise
  except jinja2.TemplateError as e:
    raise TemplateError(f"the chat template failed to render: {e}") from e
