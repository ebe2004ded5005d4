"""The stop rules of a diverging or collapsing run, fed the numbers of
real runs (the issue's probes and the healthy runs of configs/ and the
tests), and the checkpoint they name."""

import math

import pytest

from qlora_jax.engine import divergence

V = 49152  # SmolLM2's vocabulary


def _step(loss, grad, update, weights, finite=True):
  return {
    "loss": loss,
    "grad_norm": grad,
    "update_norm": update,
    "param_norm": weights,
    "params_finite": finite,
  }


# (numbers, V)
HEALTHY = [
  (_step(2.0, 1.5, 0.15, 16.7), V),  # a first LoRA step: B = 0, norm of A
  (_step(math.log(V), 0.8, 0.2, 16.7), V),  # untrained, learning
  (_step(0.01, 0.0, 0.0, 16.7), V),  # a fitted batch, gradient underflows
  (_step(0.7, 0.0, 1e-3, 0.0), 2),  # weights all zero at the start
  (_step(0.7, 3.0, 100.0 * 16.7, 16.7), 2),  # at the limit, not beyond
  (_step(0.0, 0.0, 0.0, 1.0), 1),  # a single-label classifier (warned of)
  (_step(math.log(V), 0.0, 0.0, 0.0), V),  # nothing trains (warned of)
]


@pytest.mark.parametrize("numbers,classes", HEALTHY)
def test_healthy_steps_pass(numbers, classes):
  assert divergence.diagnose(numbers, classes) is None


# (numbers, V, a piece of the reason, whether the starting weights are bad)
BAD = [
  (_step(math.nan, 1.0, 1.0, 1.0), V, "the loss is nan", True),
  (_step(math.inf, 1.0, 1.0, 1.0), V, "the loss is inf", True),
  (_step(1.0, math.inf, math.nan, 1.0), V, "gradient norm is inf", True),
  (_step(1.0, 1.0, math.inf, 1.0), V, "the update norm is inf", False),
  (_step(1.0, 1.0, 1.0, math.inf), V, "the weights' norm is inf", True),
  (_step(1.0, 1.0, 1.0, 1.0, finite=False), V, "weights non-finite", False),
  # lr 1e6 on SmolLM2, step 2: uniform predictions, no gradient at all.
  (_step(math.log(V), 0.0, 6.8e7, 1.0e3), V, "collapsed", True),
  (_step(math.log(2) * 1.005, 0.0, 0.0, 1.0), 2, "= ln 2", True),
  # lr 1e30, step 1: one step moves the weights to 1e30.
  (_step(0.7, 2.0, 1e31, 16.7), 2, "e+29 times the norm 16.7", False),
  (_step(0.7, 2.0, 101.0 * 16.7, 16.7), 2, "101 times", False),
]


@pytest.mark.parametrize("numbers,classes,reason,started_bad", BAD)
def test_bad_steps_are_named(numbers, classes, reason, started_bad):
  what, bad = divergence.diagnose(numbers, classes)
  assert reason in what and bad == started_bad, what


def test_the_last_good_checkpoint_is_before_the_bad_weights():
  # A bad update at step 7: the weights of step 6 are still good.
  assert divergence.last_good([2, 4, 6], 7, started_bad=False) == 6
  # A non-finite loss at step 7 is the loss of step 6's weights.
  assert divergence.last_good([2, 4, 6], 7, started_bad=True) == 4
  assert divergence.last_good([1], 2, started_bad=True) is None
  assert divergence.last_good([], 1, started_bad=False) is None


def test_the_message_names_the_step_and_never_step_none():
  e = divergence.error(3, "the loss is nan", None, "/w/checkpoints", 1e30)
  text = str(e)
  assert "\n" not in text and "None" not in text
  assert text.startswith("training stopped at step 3: the loss is nan; ")
  assert "no checkpoint in /w/checkpoints is good" in text
  assert "opt.learning_rate (this run's is 1e+30)" in text
  e = divergence.error(3, "the loss is nan", 1, "/w/checkpoints", 1e30)
  assert "the last good checkpoint is step 1 in /w/checkpoints" in str(e)
