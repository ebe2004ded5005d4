"""GRPO's generation batches, and its pass@1 on held-out prompts.

Every `grpo.mu` optimizer steps the loop draws B prompts
(train.batch_size) and samples G completions of each (grpo.group_size)
with the KV cache from the current adapters, all B G in one batched
`models.generate` of fixed shape (prompts left-padded to one width,
`grpo.max_new_tokens` new tokens), so one compiled program serves every
generation of a run. The sampling key is the seed's key with a stream
tag and the step folded in: a resumed run samples the same completions
bit for bit. The completions are decoded up to their end token, scored
by `grpo.reward` on the host, and turned into the step's batch
(`grpo.sequences`, advantages normalized within each group); the
sampling policy's log-probs (grpo.mu > 1) and the reference's (grpo.beta
> 0) are computed once per generation batch, each by one jitted forward
pass.

Evaluation answers every held-out prompt greedily (temperature 0, the
same batching as `answers`): pass@1 is the share whose completion's
reward reaches `grpo.pass_reward`.
"""

import dataclasses
import json
import pathlib
import time
from collections.abc import Sequence

import jax
import numpy as np

from qlora_jax import data, models
from qlora_jax import nn as qnn
from qlora_jax.data.prompts import PromptExample
from qlora_jax.engine import answers, dpo, grpo, losses, rewards, sharding
from qlora_jax.engine import workdir as run_dir
from qlora_jax.engine.grpo_loss import GrpoSettings, advantages
from qlora_jax.engine.rewards import Reward

SAMPLING_STREAM = 0x5A4D  # folded into the seed's key: apart from dropout's


@dataclasses.dataclass
class Generation:
  """One generation batch: the step's host batch and what it measured."""

  batch: dict[str, np.ndarray]
  metrics: dict[str, float]
  seconds: float  # sampling with the KV cache (the generate call)


class Rollouts:
  """Samples, scores and batches GRPO's completions; evaluates pass@1."""

  def __init__(
    self,
    settings: GrpoSettings,
    model,
    tokenizer: data.Tokenizer,
    reward: Reward,
    train_examples: Sequence[PromptExample],
    eval_examples: Sequence[PromptExample],
    eval_arrays: dict[str, np.ndarray],
    *,
    seed: int,
    batch_size: int,
    mesh,
    reference: bool,
  ):
    self.s = settings
    self.model = model
    self.tokenizer = tokenizer
    self.reward = reward
    self.train_examples = list(train_examples)
    self.eval_examples = list(eval_examples)
    self.batch_size = batch_size
    self.mesh = mesh
    self.ends = tuple(answers.end_ids(tokenizer, model.config))
    self.key = jax.random.fold_in(jax.random.key(seed), SAMPLING_STREAM)
    self.current: Generation | None = None
    self.times: list[list[float]] = []  # per batch: [generating, in all]
    self.eval_prompts = answers.Prompts(
      eval_arrays["prompt_ids"],
      eval_arrays["prompt_mask"],
      [str(e.row.get(reward.field, "")) for e in self.eval_examples],
      [e.prompt for e in self.eval_examples],
    )
    t = settings.temperature
    self.logps = jax.jit(
      lambda v, rows: losses.token_logps(model, v, rows, True, None, t)
    )
    self.reference = None
    if reference:
      off = dpo.adapters_off(model)
      self.reference = jax.jit(
        lambda v, rows: losses.token_logps(off, v, rows, True, None, t)
      )

  def batch(self, step: int, params, frozen, train_it) -> Generation:
    """The generation batch of optimizer step `step` + 1: a new one every
    grpo.mu steps (and after a resume), else the current one again."""
    if self.current is None or step % self.s.mu == 0:
      self.current = self._sample(step, params, frozen, next(train_it))
    else:
      self.current = dataclasses.replace(self.current, seconds=0.0)
    return self.current

  def timed(self, generation: Generation, seconds: float) -> None:
    """Books a step's `seconds` (its batch, generation included, and the
    optimizer step) to its generation batch."""
    if generation.seconds or not self.times:
      self.times.append([generation.seconds, 0.0])
    self.times[-1][1] += seconds

  def generate_share(self) -> float:
    """The share of step time spent generating, over the generation
    batches since the run started, leaving out the first (it compiles)
    once there are others."""
    times = np.asarray(self.times[1:] or self.times)
    return float(times[:, 0].sum() / max(times[:, 1].sum(), 1e-9))

  def train_metrics(self, metrics) -> dict[str, float]:
    """The current generation batch's figures, the step's clip fraction
    and KL per completion token, and the share of time generating."""
    weight = max(float(metrics["weight"]), 1e-9)
    out = dict(self.current.metrics)
    out["clip_fraction"] = float(metrics["clipped"]) / weight
    if self.reference is not None:
      out["kl"] = float(metrics["kl"]) / weight
    out["generate_share"] = self.generate_share()
    return out

  def _sample(self, step: int, params, frozen, prompts) -> Generation:
    s, g = self.s, self.s.group_size
    variables = qnn.merge_trees(params, frozen)
    ids = np.repeat(prompts["prompt_ids"], g, axis=0)
    mask = np.repeat(prompts["prompt_mask"], g, axis=0)
    start = time.perf_counter()
    new = models.generate(
      self.model,
      variables,
      ids,
      mask,
      max_new_tokens=s.max_new_tokens,
      eos_token_id=self.ends,
      pad_token_id=self.tokenizer.pad_id,
      temperature=s.temperature,
      top_p=s.top_p,
      rng=jax.random.fold_in(self.key, step),
    )
    new = np.asarray(jax.device_get(new))
    seconds = time.perf_counter() - start
    examples = [self.train_examples[i] for i in np.repeat(prompts["index"], g)]
    rewards = self._score(examples, new)
    batch = grpo.sequences(ids, mask, new, self.ends)
    batch[grpo.ADVANTAGES] = advantages(
      rewards.reshape(-1, g), s.scale_rewards
    ).reshape(-1)
    if s.mu > 1 or self.reference is not None:
      rows = sharding.put_batch(
        self.mesh, {k: batch[k] for k in data.LM_FIELDS}
      )
      if s.mu > 1:
        batch[grpo.OLD] = np.asarray(self.logps(variables, rows))
      if self.reference is not None:
        batch[grpo.REFERENCE] = np.asarray(self.reference(variables, rows))
    groups = rewards.reshape(-1, g)
    metrics = {
      "reward": float(rewards.mean()),
      "reward_std": float(rewards.std()),
      "zero_std_groups": float(np.mean(groups.std(axis=1) == 0)),
      "completion_length": float(batch["loss_mask"].sum(axis=1).mean()),
    }
    return Generation(batch, metrics, seconds)

  def _score(self, examples, new: np.ndarray) -> np.ndarray:
    """float64 rewards of completions `new` (token rows) of `examples`."""
    out = []
    for e, row in zip(examples, new, strict=True):
      said = answers.decode_answer(row, self.ends, self.tokenizer)
      out.append(self.reward(e.prompt, said, e.row, e.where))
    return np.asarray(out, np.float64)

  def evaluate(self, params, frozen) -> tuple[dict[str, float], dict]:
    """Greedy completions of the held-out prompts: their mean reward,
    pass@1 and mean length in tokens; and {"completions", "rewards"}."""
    variables = qnn.merge_trees(params, frozen)
    new = answers.generate_ids(
      self.model,
      variables,
      self.eval_prompts,
      self.tokenizer,
      self.batch_size,
      self.s.max_new_tokens,
    )
    said = [answers.decode_answer(r, self.ends, self.tokenizer) for r in new]
    rewards = np.asarray(
      [
        self.reward(e.prompt, c, e.row, e.where)
        for e, c in zip(self.eval_examples, said, strict=True)
      ]
    )
    is_end = np.isin(new, np.asarray(self.ends, np.int32))
    lengths = np.where(is_end.any(1), is_end.argmax(1) + 1, new.shape[1])
    metrics = {
      "reward": float(rewards.mean()),
      "pass@1": float(np.mean(rewards >= self.s.pass_reward)),
      "completion_length": float(lengths.mean()),
    }
    return metrics, {"completions": said, "rewards": rewards.tolist()}

  def write_predictions(self, path: pathlib.Path, predicted: dict) -> None:
    """predictions.jsonl: each held-out prompt, its target (the row's
    grpo.answer_field, "" without one), greedy completion and reward."""
    records = [
      {"prompt": p, "answer": a, "generated": c, "reward": float(r)}
      for p, a, c, r in zip(
        self.eval_prompts.texts,
        self.eval_prompts.answers,
        predicted["completions"],
        predicted["rewards"],
        strict=True,
      )
    ]
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    run_dir.write_atomic(path, text)


def make(s, run_data, model, mesh) -> tuple[grpo.Grpo, Rollouts]:
  """The objective and rollouts of a GRPO run (`Settings` `s`): its
  reward resolved once and every row's target checked (file:line)."""
  reward = rewards.resolve(s.grpo.reward, s.grpo.answer_field)
  for examples in (run_data.train_examples, run_data.eval_examples):
    reward.check_rows([e.row for e in examples], [e.where for e in examples])
  reference = s.grpo.beta > 0  # the settings check that there is one
  objective = grpo.Grpo(s.grpo, reference)
  return objective, Rollouts(
    s.grpo,
    model,
    run_data.tokenizer,
    reward,
    run_data.train_examples,
    run_data.eval_examples,
    run_data.eval,
    seed=s.train.seed,
    batch_size=s.train.batch_size,
    mesh=mesh,
    reference=reference,
  )
