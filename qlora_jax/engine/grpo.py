"""Group relative policy optimization over adapters (`train.objective:
grpo`): the objective the train step takes, and the batch it reads.

A step's batch is B prompts x G sampled completions (`engine.rollouts`
samples them, scores them and normalizes the advantages), each row a
left-padded prompt and its completion, as the LM fields [B G, L] with
the loss on the completion's tokens through its end token, and:
  advantages  [B G]     the completion's group-normalized advantage
  old_logps   [B G, L]  the sampling policy's per-token log-probs, when
                        grpo.mu > 1 (computed once per generation batch);
                        with mu 1 the step's own, gradient stopped (the
                        ratio is 1: the same forward pass, none extra)
  ref_logps   [B G, L]  the reference's (the model with adapters off,
                        `dpo.adapters_off`), when grpo.beta > 0
A prompt may take data.max_length + 1 - grpo.max_new_tokens tokens (a
prompt and its completion fill at most data.max_length + 1); the prompts
of a split are left-padded to its longest, so every batch, generation
and step has one shape and compiles once (rows of L = that width +
max_new_tokens - 1). The losses are `grpo_loss`'s.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from qlora_jax import data
from qlora_jax import nn as qnn
from qlora_jax.engine import losses
from qlora_jax.engine.grpo_loss import GrpoSettings, token_terms

ADVANTAGES, OLD, REFERENCE = "advantages", "old_logps", "ref_logps"


def prompt_width(max_length: int, max_new_tokens: int) -> int:
  """Tokens a prompt may take: rows of at most `max_length` inputs hold a
  prompt and its completion (max_length + 1 tokens)."""
  return max_length + 1 - max_new_tokens


@dataclasses.dataclass(frozen=True)
class Grpo:
  """The objective `steps.train_step` takes for GRPO.

  Attributes:
    settings: the `grpo` section.
    reference: whether batches carry the reference's log-probs (a KL,
      grpo.beta > 0).
  """

  settings: GrpoSettings
  reference: bool
  sum_keys = ("loss", "weight", "clipped", "kl")

  def sums(self, model, params, frozen, batch, deterministic, rngs=None):
    """`sum_keys` sums over the batch's completion tokens, differentiable
    in `params`: the loss summed (divided by "weight", the token count,
    it is DAPO's token-level mean)."""
    variables = qnn.merge_trees(params, frozen)
    rows = {k: batch[k] for k in data.LM_FIELDS}
    logps = losses.token_logps(
      model, variables, rows, deterministic, rngs, self.settings.temperature
    )
    loss, clipped, kl = token_terms(
      logps,
      batch.get(OLD, logps),
      batch.get(REFERENCE),
      batch["loss_mask"],
      batch[ADVANTAGES],
      self.settings,
    )
    return {
      "loss": jnp.sum(loss),
      "weight": jnp.sum(batch["loss_mask"].astype(jnp.float32)),
      "clipped": jnp.sum(clipped),
      "kl": jnp.sum(kl),
    }

  def fields(self) -> tuple[str, ...]:
    """The batch's fields beyond the LM ones."""
    out = (ADVANTAGES,)
    if self.settings.mu > 1:
      out += (OLD,)
    return out + ((REFERENCE,) if self.reference else ())

  def batch_shapes(self, prompts: int, seq: int) -> dict:
    """Abstract arrays of a step's batch of `prompts` prompts (G rows
    each) of `seq` tokens."""
    rows = prompts * self.settings.group_size
    out = {}
    for name in data.LM_FIELDS:
      dtype = jnp.float32 if name == "loss_mask" else jnp.int32
      out[name] = jax.ShapeDtypeStruct((rows, seq), dtype)
    for name in self.fields():
      shape = (rows,) if name == ADVANTAGES else (rows, seq)
      out[name] = jax.ShapeDtypeStruct(shape, jnp.float32)
    return out


def sequences(prompt_ids, prompt_mask, new, ends) -> dict[str, np.ndarray]:
  """LM fields [N, P + T - 1] of left-padded prompts [N, P] followed by
  their completions [N, T]: positions follow the mask (as generation
  numbered them), the loss covers each completion through its first end
  token (all T tokens when it has none)."""
  n, width = prompt_ids.shape
  steps = new.shape[1]
  full = np.concatenate([prompt_ids, new], axis=1).astype(np.int32)
  segments = np.concatenate(
    [prompt_mask, np.ones((n, steps), np.int32)], axis=1
  ).astype(np.int32)
  is_end = np.isin(new, np.asarray(list(ends), np.int32))
  length = np.where(is_end.any(1), is_end.argmax(1) + 1, steps)
  completion = np.arange(steps)[None, :] < length[:, None]
  loss_mask = np.concatenate(
    [np.zeros((n, width - 1), np.float32), completion.astype(np.float32)],
    axis=1,
  )
  return {
    "input_ids": full[:, :-1],
    "segment_ids": segments[:, :-1],
    "positions": np.maximum(np.cumsum(segments[:, :-1], axis=1) - 1, 0).astype(
      np.int32
    ),
    "targets": full[:, 1:],
    "loss_mask": loss_mask,
  }
