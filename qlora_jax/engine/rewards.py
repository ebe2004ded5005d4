"""GRPO's verifiable rewards (`grpo.reward`): a completion's score.

  exact      1 when the completion equals the row's target up to case,
             surrounding whitespace and a final full stop
             (`answers.same_answer`, as accuracy by generation), else 0
  contains   1 when the target occurs in the completion, ignoring case
  regex      1 when the target, a Python regex, matches somewhere in the
             completion (`re.search`), else 0
  mod:fn     `fn(prompt, completion, row) -> float` of an importable module

The target is the row's `grpo.answer_field`. `prompt` is the text of the
prompt's last message, `completion` the decoded completion up to its end
token, `row` the whole JSON object of the data line. A row the reward
cannot read (no target, a target that is not a string, a bad regex) is an
error naming the file:line before training starts; a function that raises
or returns a non-finite value or something not a number is an error
naming the function and the row, raised before the step it would feed.
"""

import dataclasses
import importlib
import math
import numbers
import re
from collections.abc import Callable, Sequence

from qlora_jax.engine.answers import same_answer

BUILT_IN = ("exact", "contains", "regex")


class RewardError(ValueError):
  """A reward function that fails or returns no finite number."""


def _exact(prompt, completion, target):
  del prompt
  return float(same_answer(completion, target))


def _contains(prompt, completion, target):
  del prompt
  return float(target.lower() in completion.lower())


def _regex(prompt, completion, target):
  del prompt
  return float(re.search(target, completion) is not None)


@dataclasses.dataclass(frozen=True)
class Reward:
  """A resolved `grpo.reward`: a built-in reading `field`, or a function."""

  name: str
  field: str
  fn: Callable

  @property
  def built_in(self) -> bool:
    return self.name in BUILT_IN

  def check_rows(self, rows: Sequence[dict], wheres: Sequence[str]) -> None:
    """A built-in's target of every row: present, a string, and for
    "regex" a pattern that compiles. Raises ValueError naming file:line."""
    if not self.built_in:
      return
    for row, where in zip(rows, wheres, strict=True):
      if self.field not in row:
        raise ValueError(
          f'{where}: missing field "{self.field}", the target of '
          f"grpo.reward {self.name!r} (grpo.answer_field)"
        )
      target = row[self.field]
      if not isinstance(target, str):
        raise ValueError(
          f'{where}: field "{self.field}" must be a string (the target of '
          f"grpo.reward {self.name!r}), got {type(target).__name__}"
        )
      if self.name == "regex":
        try:
          re.compile(target)
        except re.error as e:
          raise ValueError(
            f'{where}: field "{self.field}" {target!r} is not a regex '
            f"(grpo.reward 'regex'): {e}"
          ) from e

  def __call__(self, prompt: str, completion: str, row: dict, where: str):
    """The reward as a float; raises `RewardError` naming the function and
    `where` (the row's file:line)."""
    args = (prompt, completion, row[self.field] if self.built_in else row)
    try:
      value = self.fn(*args)
    except Exception as e:
      raise RewardError(
        f"grpo.reward {self.name} raised {type(e).__name__}: {e} on the "
        f"row at {where} (completion {completion!r})"
      ) from e
    if not isinstance(value, numbers.Real):  # bool counts as 0 / 1
      raise RewardError(
        f"grpo.reward {self.name} returned {value!r} "
        f"({type(value).__name__}), not a number, on the row at {where} "
        f"(completion {completion!r})"
      )
    value = float(value)
    if not math.isfinite(value):
      raise RewardError(
        f"grpo.reward {self.name} returned {value}, not a finite number, on "
        f"the row at {where} (completion {completion!r})"
      )
    return value


def resolve(name: str, field: str) -> Reward:
  """The reward `grpo.reward` names. Raises ValueError naming the field
  when it is neither a built-in nor an importable `module:function`."""
  built = {"exact": _exact, "contains": _contains, "regex": _regex}
  if name in built:
    return Reward(name, field, built[name])
  module, _, attr = name.partition(":")
  if not module or not attr:
    raise ValueError(
      f"grpo.reward: {name!r} is none of {BUILT_IN} nor 'module:function'"
    )
  try:
    fn = getattr(importlib.import_module(module), attr)
  except (ImportError, AttributeError) as e:
    raise ValueError(
      f"grpo.reward: {name!r} does not resolve ({type(e).__name__}: {e})"
    ) from e
  if not callable(fn):
    raise ValueError(f"grpo.reward: {name!r} is not callable")
  return Reward(name, field, fn)
