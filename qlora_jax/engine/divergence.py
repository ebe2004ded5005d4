"""Stops a run whose training diverges or collapses, naming the step.

Every step's numbers are checked (`diagnose`) before its checkpoint is
saved, so no checkpoint of a bad step is ever written. A step that breaks
a rule stops the run with a `DivergenceError` naming the step, the rule and
the newest checkpoint whose weights are finite and gave a finite loss
(`last_good`). The rules, with thresholds far from any healthy run:

* non-finite: the loss, a trainable weight, or the norm of the gradient,
  of the update or of the weights is NaN or infinite (a norm overflows
  float32 once its elements pass about 1e19).
* blow-up: the update norm exceeds `UPDATE_RATIO` (100) times the norm of
  the trainable weights it is added to. A healthy step moves them by a
  fraction of their norm (at most 0.04 in the main job, configs/default.py,
  and 0.3 in the tests' tiny BERT at lr 3e-2); a step 100 times their size
  replaces them outright (lr 1e6 and 1e30 pass it by orders of magnitude
  at their first step).
* collapse: the gradient is exactly 0 while the loss is within
  `COLLAPSE_TOLERANCE` (1%) of ln V, V the number of classes or of
  vocabulary entries: uniform predictions that can no longer learn (lr 1e6
  reaches it from step 2).

Trainable weights of norm 0 (none at all, or all zero at the start) are
judged by the non-finite rule only: there is nothing to compare an update
with, and a run that trains nothing is warned of when it starts.

The loss of step s is that of the weights after step s - 1: a non-finite
loss, gradient or weights' norm, or a collapse, at step s makes checkpoint
s - 1 bad too.
"""

import math
from collections.abc import Iterable, Mapping

UPDATE_RATIO = 100.0
COLLAPSE_TOLERANCE = 0.01


class DivergenceError(FloatingPointError):
  """Training diverged or collapsed; the message names the step and the
  last good checkpoint."""


def diagnose(m: Mapping[str, float], classes: int) -> tuple[str, bool] | None:
  """What is wrong with a step, and whether the weights it started from are
  bad too; None for a healthy step.

  Args:
    m: the step's mean `loss`, `grad_norm`, `update_norm`, `param_norm`
      (of the trainable weights before the update) and `params_finite`
      (whether every trainable weight after it is finite).
    classes: V, the classes of a classifier or the vocabulary of a
      language model.
  """
  loss, grad, update = m["loss"], m["grad_norm"], m["update_norm"]
  if not math.isfinite(loss):
    return f"the loss is {loss}", True
  if not math.isfinite(grad):
    return f"the gradient norm is {grad}", True
  if not m["params_finite"]:
    return "the update made the weights non-finite", False
  if not math.isfinite(update):
    return f"the update norm is {update}, beyond float32's range", False
  weights = m["param_norm"]
  if not math.isfinite(weights):
    return f"the weights' norm is {weights}, beyond float32's range", True
  uniform = math.log(max(classes, 2))  # one class: a loss of 0, warned of
  near = abs(loss - uniform) <= COLLAPSE_TOLERANCE * uniform
  if weights > 0 and grad == 0 and near:
    return (
      f"the model collapsed: loss {loss:.4f} = ln {classes} (uniform "
      "predictions) with a gradient of exactly 0",
      True,
    )
  if weights > 0 and update > UPDATE_RATIO * weights:
    return (
      f"the update norm {update:.3g} is {update / weights:.3g} times the "
      f"norm {weights:.3g} of the weights it changes (the limit is "
      f"{UPDATE_RATIO:g} times)",
      False,
    )
  return None


def last_good(saved: Iterable[int], step: int, started_bad: bool) -> int | None:
  """The newest saved checkpoint before the bad weights of `step` (before
  step - 1's too when `started_bad`); None when there is none."""
  bad_from = step - 1 if started_bad else step
  good = [s for s in saved if s < bad_from]
  return max(good) if good else None


def error(
  step: int, what: str, good: int | None, directory, learning_rate: float
) -> DivergenceError:
  """The one-line error of a stopped run."""
  where = (
    f"the last good checkpoint is step {good} in {directory}"
    if good is not None
    else f"no checkpoint in {directory} is good to go back to"
  )
  return DivergenceError(
    f"training stopped at step {step}: {what}; {where}; try a lower "
    f"opt.learning_rate (this run's is {learning_rate:g})"
  )
