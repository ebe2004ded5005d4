"""GRPO's advantages and clipped-ratio loss, and its settings (the
config's `grpo` section), from log-probs alone; `engine.grpo` runs them on
a model.

For a prompt's group of G completions with rewards r_1..r_G:
  advantage  A_i = (r_i - mean(r)) / (std(r) + 1e-4)   (GRPO, Shao et al.
             2024; std with ddof 1, as TRL), or r_i - mean(r) with
             `scale_rewards` False (Dr. GRPO, Liu et al. 2025)
For each completion token t of completion i, with log-probs of the
policy (lp), of the policy that sampled the group (old) and of the
reference (ref), each of the logits divided by the sampling temperature:
  ratio      rho = exp(lp - old)
  loss       -min(rho A_i, clip(rho, 1 - epsilon, 1 + epsilon_high) A_i)
             + beta kl
  kl         exp(ref - lp) - (ref - lp) - 1   (the k3 estimator, as the
             GRPO paper and TRL)
A token is counted as clipped when its clipped term is the smaller one
and differs: rho < 1 - epsilon with A < 0, or rho > 1 + epsilon_high
with A > 0 (TRL's clip ratio).

The loss is summed over every completion token of the batch and divided
by their count (DAPO's token-level mean, Yu et al. 2025): each token
weighs the same whatever its completion's length, so long completions are
not down-weighted as GRPO's per-sequence mean does, and the sum over
micro-batches divided by the total count is the same number as one big
batch's (the engine's accumulation rule).
"""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from qlora_jax.quant import SpecError

STD_EPS = 1e-4  # added to a group's std before dividing (TRL's)


@dataclasses.dataclass(frozen=True)
class GrpoSettings:
  """The config's `grpo` section; the one owner of its rules."""

  group_size: int
  temperature: float
  top_p: float
  max_new_tokens: int
  mu: int
  epsilon: float
  epsilon_high: float
  beta: float
  scale_rewards: bool
  reward: str
  answer_field: str
  pass_reward: float

  def __post_init__(self):
    if self.group_size < 2:
      raise SpecError(
        "group_size",
        f"must be >= 2, got {self.group_size}: a group of one completion "
        "has an advantage of 0 (its reward minus its own mean), so nothing "
        "would train",
      )
    if not (math.isfinite(self.temperature) and self.temperature > 0):
      raise SpecError(
        "temperature",
        f"must be finite and > 0 (a group is sampled), got {self.temperature}",
      )
    if not 0.0 < self.top_p <= 1.0:
      raise SpecError("top_p", f"must be in (0, 1], got {self.top_p}")
    if self.max_new_tokens < 1:
      raise SpecError(
        "max_new_tokens", f"must be >= 1, got {self.max_new_tokens}"
      )
    if self.mu < 1:
      raise SpecError("mu", f"must be >= 1, got {self.mu}")
    if not 0.0 < self.epsilon < 1.0:
      raise SpecError("epsilon", f"must be in (0, 1), got {self.epsilon}")
    if self.epsilon_high and not (
      math.isfinite(self.epsilon_high) and self.epsilon_high >= self.epsilon
    ):
      raise SpecError(
        "epsilon_high",
        f"must be 0 (= grpo.epsilon) or >= grpo.epsilon ({self.epsilon}), "
        f"got {self.epsilon_high}",
      )
    if not (math.isfinite(self.beta) and self.beta >= 0):
      raise SpecError("beta", f"must be finite and >= 0, got {self.beta}")
    if not self.reward.strip():
      raise SpecError("reward", "empty: exact, contains, regex or mod:fn")
    if not math.isfinite(self.pass_reward):
      raise SpecError("pass_reward", f"must be finite, got {self.pass_reward}")

  @property
  def upper(self) -> float:
    """The ratio's upper clip: 1 + (epsilon_high or epsilon)."""
    return 1.0 + (self.epsilon_high or self.epsilon)


def advantages(rewards: np.ndarray, scale: bool) -> np.ndarray:
  """float32 [P, G] advantages of rewards [P, G] (one row per prompt's
  group), normalized within each group."""
  r = np.asarray(rewards, np.float64)
  centred = r - r.mean(axis=1, keepdims=True)
  if scale:
    centred = centred / (r.std(axis=1, ddof=1, keepdims=True) + STD_EPS)
  return centred.astype(np.float32)


def token_terms(logps, old, ref, mask, adv, s: GrpoSettings):
  """(loss, clipped, kl), each [N, L] and zero off the completion tokens,
  from the policy's per-token log-probs `logps` [N, L], the sampling
  policy's `old` and the reference's `ref` ([N, L]; None: no reference,
  kl 0), the completion-token mask [N, L] and the advantages [N]. Only
  `logps` is differentiated."""
  old = jax.lax.stop_gradient(old)
  a = adv[:, None]
  ratio = jnp.exp(logps - old)
  clipped_ratio = jnp.clip(ratio, 1.0 - s.epsilon, s.upper)
  loss = -jnp.minimum(ratio * a, clipped_ratio * a)
  if ref is None:
    kl = jnp.zeros_like(logps)
  else:
    d = jax.lax.stop_gradient(ref) - logps
    kl = jnp.exp(d) - d - 1.0
    loss = loss + s.beta * kl
  low = (ratio < 1.0 - s.epsilon) & (a < 0)
  clipped = low | ((ratio > s.upper) & (a > 0))
  m = mask.astype(jnp.float32)
  return loss * m, clipped.astype(jnp.float32) * m, kl * m
