"""GRPO's numbers against NumPy: group advantages, ratios, clipping and
the k3 KL (`grpo_loss`), their gradient in the log-probs, the batch rows
built from prompts and completions (`grpo.sequences`), and the objective
on the tiny Llama against float64 log-softmax of its full logits."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qlora_jax import models
from qlora_jax import nn as qnn
from qlora_jax.engine import grpo
from qlora_jax.engine.grpo_loss import GrpoSettings, advantages, token_terms
from qlora_jax.quant import SpecError

FIXTURE = "tests/data/hf/llama_gqa"
SETTINGS = GrpoSettings(
  group_size=4,
  temperature=0.7,
  top_p=1.0,
  max_new_tokens=4,
  mu=2,
  epsilon=0.2,
  epsilon_high=0.28,
  beta=0.05,
  scale_rewards=True,
  reward="exact",
  answer_field="answer",
  pass_reward=1.0,
)


def _numpy_terms(lp, old, ref, mask, adv, eps, eps_high, beta):
  """(loss, clipped, kl, d loss / d lp) per token in float64."""
  a = adv[:, None]
  rho = np.exp(lp - old)
  clipped_rho = np.clip(rho, 1 - eps, 1 + eps_high)
  unclipped_term, clipped_term = rho * a, clipped_rho * a
  loss = -np.minimum(unclipped_term, clipped_term)
  # The gradient flows through the unclipped term when it is the minimum
  # (ties go to it), else through the clipped one, constant outside the
  # clip range.
  inside = (rho >= 1 - eps) & (rho <= 1 + eps_high)
  d = np.where(unclipped_term <= clipped_term, -rho * a, -rho * a * inside)
  kl = np.exp(ref - lp) - (ref - lp) - 1
  loss = loss + beta * kl
  d = d + beta * (1 - np.exp(ref - lp))
  low = (rho < 1 - eps) & (a < 0)
  high = (rho > 1 + eps_high) & (a > 0)
  return loss * mask, (low | high) * mask, kl * mask, d * mask


@pytest.mark.parametrize("scale", [True, False])
def test_advantages_equal_numpy(scale):
  rng = np.random.default_rng(0)
  rewards = rng.integers(0, 3, (5, 4)).astype(np.float64)
  rewards[0] = 1.0  # a group of equal rewards: advantages exactly 0
  got = advantages(rewards, scale)
  want = rewards - rewards.mean(1, keepdims=True)
  if scale:
    want = want / (rewards.std(1, ddof=1, keepdims=True) + 1e-4)
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
  assert np.all(got[0] == 0)


def test_ratios_clipping_kl_and_gradient_equal_numpy():
  """Per-token loss, clipped count and KL within 1e-6 (float32) of
  NumPy's in float64, over ratios on both sides of both clip bounds and
  advantages of both signs; d loss / d log-probs within 1e-5."""
  rng = np.random.default_rng(1)
  n, length = 8, 6
  lp = rng.normal(-2, 1, (n, length))
  old = lp + rng.normal(0, 0.4, (n, length))  # ratios ~ 0.5 .. 2
  ref = lp + rng.normal(0, 0.3, (n, length))
  mask = (rng.random((n, length)) < 0.8).astype(np.float64)
  adv = rng.normal(0, 1, n)
  want = _numpy_terms(lp, old, ref, mask, adv, 0.2, 0.28, 0.05)
  rho = np.exp(lp - old)
  assert (rho < 0.8).any() and (rho > 1.28).any()  # both bounds are hit
  assert want[1].sum() > 0  # some tokens are clipped

  f32 = lambda x: jnp.asarray(x, jnp.float32)  # noqa: E731
  terms = jax.jit(
    lambda lp: token_terms(
      lp, f32(old), f32(ref), f32(mask), f32(adv), SETTINGS
    )
  )
  loss, clipped, kl = terms(f32(lp))
  np.testing.assert_allclose(loss, want[0], rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(clipped, want[1])
  np.testing.assert_allclose(kl, want[2], rtol=1e-5, atol=1e-6)
  grad = jax.grad(lambda lp: terms(lp)[0].sum())(f32(lp))
  np.testing.assert_allclose(grad, want[3], rtol=1e-5, atol=1e-6)
  # No reference: no KL term.
  s = dataclasses.replace(SETTINGS, beta=0.0)
  loss, _, kl = token_terms(f32(lp), f32(old), None, f32(mask), f32(adv), s)
  plain = _numpy_terms(lp, old, lp, mask, adv, 0.2, 0.28, 0.0)
  np.testing.assert_allclose(loss, plain[0], rtol=1e-5, atol=1e-6)
  assert not np.asarray(kl).any()


def test_a_group_of_one_is_refused_naming_the_field():
  with pytest.raises(SpecError) as e:
    dataclasses.replace(SETTINGS, group_size=1)
  assert e.value.field == "group_size" and "advantage of 0" in str(e.value)


def test_sequences_put_each_completion_after_its_prompt():
  """Left-padded prompts then completions; positions follow the mask;
  the loss covers each completion through its first end token (2)."""
  prompt_ids = np.array([[0, 0, 7, 8], [5, 6, 7, 8]], np.int32)
  prompt_mask = (prompt_ids != 0).astype(np.int32)
  new = np.array([[9, 2, 0], [9, 9, 9]], np.int32)
  b = grpo.sequences(prompt_ids, prompt_mask, new, (2,))
  np.testing.assert_array_equal(
    b["input_ids"], [[0, 0, 7, 8, 9, 2], [5, 6, 7, 8, 9, 9]]
  )
  np.testing.assert_array_equal(
    b["targets"], [[0, 7, 8, 9, 2, 0], [6, 7, 8, 9, 9, 9]]
  )
  np.testing.assert_array_equal(
    b["segment_ids"], [[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]]
  )
  np.testing.assert_array_equal(
    b["positions"], [[0, 0, 0, 1, 2, 3], [0, 1, 2, 3, 4, 5]]
  )
  np.testing.assert_array_equal(
    b["loss_mask"], [[0, 0, 0, 1, 1, 0], [0, 0, 0, 1, 1, 1]]
  )


def test_the_objective_on_a_model_equals_numpy():
  """Grpo.sums on the tiny Llama with random LoRA B: its loss,
  clipped count and KL sums equal NumPy's from the model's full logits
  divided by the temperature (log-softmax in float64), within 1e-5
  relative."""
  lm = models.from_pretrained(
    FIXTURE,
    lora={"targets": "all-linear", "rank": 4, "alpha": 8, "dropout": 0.0},
    with_tokenizer=False,
  )
  trainable, frozen = qnn.split_trainable(lm.variables)
  keys = iter(jax.random.split(jax.random.key(1), 1000))
  trainable = jax.tree.map(
    lambda x: 0.05 * jax.random.normal(next(keys), x.shape, x.dtype),
    trainable,
  )
  rng = np.random.default_rng(2)
  prompt_ids = rng.integers(4, 96, (8, 5)).astype(np.int32)
  prompt_ids[:4, :2] = 0
  new = rng.integers(3, 96, (8, 4)).astype(np.int32)
  new[::3, 2] = 2  # some completions end early
  batch = grpo.sequences(
    prompt_ids, (prompt_ids != 0).astype(np.int32), new, (2,)
  )
  variables = qnn.merge_trees(trainable, frozen)
  logits = jax.jit(
    lambda v, b: lm.model.apply(
      v, b["input_ids"], b["segment_ids"], b["positions"]
    )
  )(variables, batch)
  z = np.asarray(logits, np.float64) / SETTINGS.temperature
  z = z - z.max(-1, keepdims=True)
  logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
  lp = np.take_along_axis(logp, batch["targets"][..., None], -1)[..., 0]
  mask = batch["loss_mask"].astype(np.float64)
  old = lp + rng.normal(0, 0.3, lp.shape)
  ref = lp + rng.normal(0, 0.3, lp.shape)
  adv = rng.normal(0, 1, len(lp))
  batch.update(
    advantages=adv.astype(np.float32),
    old_logps=old.astype(np.float32),
    ref_logps=ref.astype(np.float32),
  )
  objective = grpo.Grpo(SETTINGS, reference=True)
  sums = jax.jit(lambda p, b: objective.sums(lm.model, p, frozen, b, True))(
    trainable, batch
  )
  want = _numpy_terms(lp, old, ref, mask, adv, 0.2, 0.28, 0.05)
  assert float(sums["weight"]) == mask.sum()
  assert float(sums["loss"]) == pytest.approx(want[0].sum(), rel=1e-5)
  assert float(sums["clipped"]) == want[1].sum() > 0
  assert float(sums["kl"]) == pytest.approx(want[2].sum(), rel=1e-5)
