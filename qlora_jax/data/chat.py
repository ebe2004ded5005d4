"""Chat templates: a checkpoint's Jinja template rendered as transformers
renders it (`apply_chat_template(..., tokenize=False)`).

The environment is the one transformers builds: sandboxed, `trim_blocks`
and `lstrip_blocks`, the `raise_exception` and `strftime_now` functions,
`tojson` keeping non-ASCII text, and the special tokens as variables. A
rendering runs under a time and size budget (`template_limits`).
"""

import datetime
import functools
import json
from collections.abc import Mapping, Sequence
from typing import Any

import jinja2

from qlora_jax.data import template_limits

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
  env = template_limits.Environment(
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
  source: str = "chat template",
) -> str:
  """The conversation as text, ready to tokenize without special tokens;
  `source` (where the template came from) names it in a budget error."""
  check_messages(messages, "chat")
  variables = dict(
    messages=[dict(m) for m in messages],
    add_generation_prompt=add_generation_prompt,
    **dict(special_tokens or {}),
  )
  try:
    return template_limits.render(_compile(template), variables)
  except TemplateError:
    raise
  except template_limits.BudgetError as e:
    raise TemplateError(
      f"{source}: the chat template was stopped: {e} (the budget of one "
      f"rendering is {template_limits.MAX_SECONDS:g} s and "
      f"{template_limits.MAX_CHARS:,} characters); fix or replace it"
    ) from e
  except jinja2.TemplateError as e:
    raise TemplateError(f"the chat template failed to render: {e}") from e


# Stands in for an assistant's text, to find what a template writes after it.
_REPLY = "\x00reply\x00"


def text_after_reply(
  template: str,
  special_tokens: Mapping[str, str] | None = None,
  source: str = "chat template",
) -> str:
  """What the template writes after an assistant's text (the end of its
  turn), from a rendering of [user, assistant]."""
  text = render(
    template,
    [
      {"role": "user", "content": "hi"},
      {"role": "assistant", "content": _REPLY},
    ],
    False,
    special_tokens,
    source,
  )
  if _REPLY not in text:
    raise TemplateError(f"{source}: the assistant's text is not rendered as is")
  return text[text.index(_REPLY) + len(_REPLY) :]
