"""The DPO losses of preference pairs and their settings (the config's
`dpo` section), from log-probs alone; `engine.dpo` runs them on a model.

A pair's log-prob is the sum of log p(token) over its answer's tokens;
with h = (log pi_c - log ref_c) - (log pi_r - log ref_r):
  sigmoid  -(1 - e) log sigmoid(beta h) - e log sigmoid(-beta h)
           (Rafailov et al. 2023; label smoothing e as conservative DPO)
  ipo      (h' - 1 / (2 beta))^2, with h' from log-ratios averaged over
           each answer's tokens (Azar et al. 2023, normalized as TRL does)
Rewards are beta (log pi - log ref) of each answer; a pair is counted
right when the chosen answer's reward is above the rejected one's.
"""

import dataclasses
import math

import jax
import jax.numpy as jnp

from qlora_jax.quant import SpecError

LOSSES = ("sigmoid", "ipo")


@dataclasses.dataclass(frozen=True)
class DpoSettings:
  """The config's `dpo` section; the one owner of its rules."""

  beta: float
  loss: str
  label_smoothing: float

  def __post_init__(self):
    if not (math.isfinite(self.beta) and self.beta > 0):
      raise SpecError("beta", f"must be finite and > 0, got {self.beta}")
    if self.loss not in LOSSES:
      raise SpecError(
        "loss", f"unknown value {self.loss!r}, expected one of {LOSSES}"
      )
    if not 0.0 <= self.label_smoothing < 0.5:
      raise SpecError(
        "label_smoothing", f"must be in [0, 0.5), got {self.label_smoothing}"
      )
    if self.loss == "ipo" and self.label_smoothing:
      raise SpecError(
        "label_smoothing", "applies to the sigmoid loss; set 0 with 'ipo'"
      )


def pair_terms(logps, ref, tokens, d: DpoSettings):
  """(loss, chosen reward, rejected reward), each [B], from the policy's
  and the reference's log-probs [B, 2] (chosen, rejected) and the
  answers' token counts [B, 2]. Only `logps` is differentiated."""
  ratios = logps - jax.lax.stop_gradient(ref)
  rewards = jax.lax.stop_gradient(d.beta * ratios)
  if d.loss == "ipo":
    per_token = ratios / jnp.maximum(tokens, 1.0)
    h = per_token[:, 0] - per_token[:, 1]
    loss = (h - 1.0 / (2.0 * d.beta)) ** 2
  else:
    z = d.beta * (ratios[:, 0] - ratios[:, 1])
    e = d.label_smoothing
    loss = -(1.0 - e) * jax.nn.log_sigmoid(z) - e * jax.nn.log_sigmoid(-z)
  return loss, rewards[:, 0], rewards[:, 1]
