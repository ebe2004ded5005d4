"""GRPO (`train.objective: grpo`) on the tiny Llama: a run that raises
the reward on a task with signal while compiling each program once, an
exact resume after SIGKILL (sampling included), and each bad input named
(a reward that raises or returns no finite number, a group of one, a
prompt longer than the context, a bad regex)."""

import collections
import dataclasses
import json
import logging
import re

import jax
import jax.numpy as jnp
import pytest

from qlora_jax import data, models
from qlora_jax.data import prompts
from qlora_jax.engine import grpo, profiling, rewards, setup, steps, train
from qlora_jax.engine.metrics import read_metrics
from qlora_jax.engine.settings import ConfigError, Settings, recorded
from tests import kill_resume, memory_test, tiny_grpo_config


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  folder = tmp_path_factory.mktemp("grpo")
  tiny_grpo_config.write_run(folder)
  return folder


def _records(workdir, kind):
  return {
    r["step"]: r
    for r in read_metrics(workdir / "metrics.jsonl")
    if r["kind"] == kind
  }


class _Compiles(logging.Handler):
  """Counts jax's "Compiling <name>" log lines by program name."""

  def __init__(self):
    super().__init__()
    self.names = collections.Counter()

  def emit(self, record):
    found = re.match(r"Compiling (\S+)", record.getMessage())
    if found:
      self.names[found.group(1)] += 1


@pytest.fixture(scope="module")
def straight(data_dir, tmp_path_factory):
  """The tiny config's 12 steps (6 generation batches of 8 prompts x 4
  completions, 2 optimizer steps each), run here, its compiles counted."""
  workdir = tmp_path_factory.mktemp("straight")
  compiles = _Compiles()
  logger = logging.getLogger("jax")
  logger.addHandler(compiles)
  jax.config.update("jax_log_compiles", True)
  try:
    final = train.train_and_evaluate(
      tiny_grpo_config.get_config(str(data_dir)), str(workdir)
    )
  finally:
    jax.config.update("jax_log_compiles", False)
    logger.removeHandler(compiles)
  return workdir, final, compiles.names


def test_a_grpo_run_raises_the_reward_compiling_once(straight):
  """The reward is 1 when a completion contains "have": the first
  generation batch averages 1/32 (the random tiny model), the last at
  least 0.5 (measured 0.656); held-out greedy pass@1 goes from 0 to at
  least 0.75 (measured 1.0). Deterministic: the seed fixes every
  sample."""
  workdir, final, compiles = straight
  steps = _records(workdir, "train")
  evals = _records(workdir, "eval")
  assert sorted(steps) == list(range(1, 13)) and sorted(evals) == [0, 6, 12]
  assert steps[1]["reward"] <= 0.05
  assert steps[12]["reward"] >= steps[1]["reward"] + 0.45
  assert evals[0]["pass@1"] == 0.0 and final["pass@1"] >= 0.75
  # mu = 2: each generation batch feeds two steps; the first step of a
  # batch has ratio 1 (the sampling policy is the current one), so
  # nothing is clipped; after an update the second one clips some.
  for step in (1, 3, 5, 7, 9, 11):
    assert steps[step]["reward"] == steps[step + 1]["reward"]
    assert steps[step]["clip_fraction"] == 0.0
  assert max(steps[s]["clip_fraction"] for s in (2, 4, 6, 8, 10, 12)) > 0
  assert steps[1]["kl"] == pytest.approx(0.0, abs=1e-6)  # policy = reference
  assert steps[12]["kl"] > 0.01
  assert 0 < steps[12]["generate_share"] < 1
  assert steps[12]["completion_length"] == 4.0  # "</s>" never sampled
  # Every program compiled once for 6 generation batches and 3
  # evaluations: the sampling and the greedy generate, the step, the
  # old and the reference log-probs.
  assert compiles["jit(_generate)"] == 2, compiles
  assert compiles["jit(train_step)"] == 1, compiles
  assert compiles["jit(<lambda>)"] == 2, compiles
  predictions = (workdir / "predictions.jsonl").read_text().splitlines()
  first = json.loads(predictions[0])
  assert set(first) == {"prompt", "answer", "generated", "reward"}


def test_sigkill_then_resume_is_exact(straight, data_dir, tmp_path):
  """A run killed after a checkpoint and resumed logs the same numbers,
  step for step, as the straight run: samples, rewards, losses."""
  workdir, _, _ = straight
  killed = tmp_path / "killed"
  config = f"tests/tiny_grpo_config.py:{data_dir}"
  proc = kill_resume.run_cli(
    config, killed, "--config.train.steps=400", wait=False
  )
  resumed_from = kill_resume.kill_after_checkpoint(proc, killed, 4)
  assert 4 <= resumed_from < 12
  train.train_and_evaluate(
    tiny_grpo_config.get_config(str(data_dir)),
    str(killed),
    allow_safe_changes=True,  # train.steps 400 -> 12
  )
  a, b = _records(workdir, "train"), _records(killed, "train")
  assert sorted(a) == sorted(b) == list(range(1, 13))
  keys = ("loss", "grad_norm", "reward", "reward_std", "clip_fraction", "kl")
  for step in a:
    for key in keys:
      assert a[step][key] == b[step][key], (step, key)
  assert _records(workdir, "eval") == _records(killed, "eval")


def raising_reward(prompt, completion, row):
  del prompt, completion, row
  return 1 / 0


def nan_reward(prompt, completion, row):
  del prompt, completion, row
  return float("nan")


def text_reward(prompt, completion, row):
  del prompt, completion, row
  return "1.0"


@pytest.mark.parametrize(
  "name,message",
  [
    ("raising_reward", "raised ZeroDivisionError: division by zero"),
    ("nan_reward", "returned nan, not a finite number"),
    ("text_reward", "returned '1.0' (str), not a number"),
  ],
)
def test_a_bad_reward_function_is_named_with_its_row(name, message):
  reward = rewards.resolve(f"tests.grpo_test:{name}", "answer")
  with pytest.raises(rewards.RewardError) as e:
    reward("the of", "have", {"prompt": "the of"}, "prompts.jsonl:3")
  text = str(e.value)
  assert f"grpo.reward tests.grpo_test:{name}" in text
  assert message in text and "prompts.jsonl:3" in text


def test_rewards_and_their_rows(tmp_path):
  exact = rewards.resolve("exact", "answer")
  assert exact("q", " Have. ", {"answer": "have"}, "f:1") == 1.0
  assert exact("q", "have had", {"answer": "have"}, "f:1") == 0.0
  contains = rewards.resolve("contains", "answer")
  assert contains("q", "We HAVE it", {"answer": "have"}, "f:1") == 1.0
  regex = rewards.resolve("regex", "answer")
  assert regex("q", "it is 42.", {"answer": r"\b4\d\b"}, "f:1") == 1.0
  path = tmp_path / "p.jsonl"
  path.write_text(
    '{"prompt": "a", "answer": "x"}\n{"prompt": "b", "answer": "(unclosed"}\n'
    '{"prompt": "c"}\n{"prompt": "d", "answer": 3}\n'
  )
  examples = prompts.read_prompt_jsonl(path)
  rows, wheres = [e.row for e in examples], [e.where for e in examples]
  with pytest.raises(ValueError, match=r"p.jsonl:2: .* is not a regex"):
    regex.check_rows(rows, wheres)
  with pytest.raises(ValueError, match=r'p.jsonl:3: missing field "answer"'):
    contains.check_rows(rows, wheres)
  with pytest.raises(ValueError, match=r"p.jsonl:4: .* must be a string"):
    exact.check_rows(rows[3:], wheres[3:])
  with pytest.raises(ValueError, match=r"grpo.reward: 'nosuch:fn' does not"):
    rewards.resolve("nosuch:fn", "answer")
  with pytest.raises(ValueError, match=r"grpo.reward: 'shout' is none of"):
    rewards.resolve("shout", "answer")


def test_prompt_rows_without_a_question_name_their_line(tmp_path):
  # The same reader rule as the preference pairs' (data.readers).
  path = tmp_path / "p.jsonl"
  ended = [
    {"role": "user", "content": "a"},
    {"role": "assistant", "content": "b"},
  ]
  for row, message in (
    ({"messages": ended}, "must end with a turn that is not the assistant"),
    ({"messages": []}, "'messages' must be a non-empty list"),
    ({"answer": "x"}, 'missing field "prompt" \\(or "messages"\\)'),
  ):
    path.write_text(json.dumps({"prompt": "a"}) + "\n" + json.dumps(row))
    with pytest.raises(ValueError, match=f"p.jsonl:2: .*{message}"):
      prompts.read_prompt_jsonl(path)
  ok = [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}]
  path.write_text(json.dumps({"messages": ok}))
  assert prompts.read_prompt_jsonl(path)[0].messages == tuple(ok)


def test_a_prompt_longer_than_the_context_names_its_line(data_dir, tmp_path):
  path = tmp_path / "long.jsonl"
  rows = [{"prompt": "the of", "answer": "have"}]
  rows.append({"prompt": " ".join(["the"] * 12), "answer": "have"})
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))
  c = tiny_grpo_config.get_config(str(data_dir))
  c.data.train_path = str(path)
  s = Settings.from_config(c)
  tok = data.Tokenizer.load(data_dir / "model")
  with pytest.raises(ValueError) as e:
    setup.make_data(s, tok, tmp_path)
  assert str(e.value).startswith(f"{path}:2: the prompt takes 17 tokens")
  assert "13 a prompt may take (data.max_length 16 + 1" in str(e.value)


SETTINGS_CASES = [
  ({"grpo.group_size": 1}, "grpo.group_size: must be >= 2, got 1"),
  ({"grpo.temperature": 0.0}, "grpo.temperature: must be finite and > 0"),
  ({"grpo.epsilon_high": 0.1}, "grpo.epsilon_high: must be 0"),
  ({"grpo.mu": 5}, "train.steps: 12 is not a multiple of grpo.mu (5)"),
  ({"grpo.max_new_tokens": 16}, "data.max_length: 16 leaves no room"),
  ({"data.eval_generate": 4}, "data.eval_generate: train.objective 'grpo'"),
  ({"data.source": "text"}, "data.source: train.objective 'grpo' reads"),
  ({"lora.init": "pissa"}, "grpo.beta: a KL needs the reference"),
  (
    {"train.mode": "full", "quant.data_type": "none", "grpo.beta": 0.0},
    None,  # full fine-tuning without a KL is allowed
  ),
]


@pytest.mark.parametrize("overrides,message", SETTINGS_CASES)
def test_grpo_settings_are_checked_in_the_first_pass(
  data_dir, overrides, message
):
  c = tiny_grpo_config.get_config(str(data_dir))
  for key, value in overrides.items():
    section, field = key.split(".")
    setattr(c[section], field, value)
  if message is None:
    assert Settings.from_config(c).train.mode == "full"
    return
  with pytest.raises(ConfigError, match=re.escape(message)):
    Settings.from_config(c)


def test_memory_model_covers_a_grpo_step():
  """XLA's compiled memory of the engine's GRPO step (QLoRA NF4 + DQ, r=8,
  remat, scanned layers; mu 2 with a reference: old and reference
  log-probs in the batch) within memory_test's 1.15x of the estimate for
  prompts x G rows."""
  config = memory_test._config(384, 3, 6, 2, 1024, 6000)
  lora, q, base, patterns = memory_test._mode("qlora_nf4_dq")
  spec = models.ModelSpec(config, "causal_lm")
  plan = models.model_plan(spec, lora, q, True)
  opts = models.Options(plan, jnp.float32, base, True, True)
  settings = Settings.from_config(tiny_grpo_config.get_config()).grpo
  objective = grpo.Grpo(dataclasses.replace(settings, group_size=3), True)
  step = steps.abstract_step(
    spec, opts, batch=2, seq=96, train_patterns=patterns, objective=objective
  )
  got = profiling.compiled_memory(step.compile())["total"]
  p = memory_test._predict(config, "qlora_nf4_dq", 2 * 3, 96, True)
  assert 1 / 1.15 <= got / p.total <= 1.15, (got, p)


def test_a_run_recorded_before_grpo_reads_with_its_defaults(data_dir):
  old = Settings.from_config(tiny_grpo_config.get_config(str(data_dir)))
  old = old.to_dict()
  del old["grpo"]
  old["train"]["objective"] = "sft"
  s = Settings.from_config(recorded(old))
  assert s.train.objective == "sft" and s.grpo.group_size == 4
  assert s.grpo.beta == 0.0 and s.grpo.reward == "exact"
