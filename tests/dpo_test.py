"""DPO (`train.objective: dpo`): the losses and their gradients against
NumPy on the tiny Llama fixture, the adapters-off reference against the
base model, bad pairs named by file:line, and a run that learns and
resumes exactly after SIGKILL."""

import json
import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qlora_jax import data, models
from qlora_jax import nn as qnn
from qlora_jax.engine import dpo, losses, profiling, sharding, steps, train
from qlora_jax.engine.dpo_loss import DpoSettings
from qlora_jax.engine.metrics import read_metrics
from qlora_jax.engine.settings import ConfigError, Settings, recorded
from tests import kill_resume, memory_test, tiny_dpo_config

ROOT = pathlib.Path(__file__).resolve().parent.parent
QUANT = {"data_type": "nf4", "block_size": 32, "double_quant": True}
LORA = {"targets": "all-linear", "rank": 4, "alpha": 8, "dropout": 0.0}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
  folder = tmp_path_factory.mktemp("dpo")
  tiny_dpo_config.write_run(folder)
  return folder


@pytest.fixture(scope="module")
def pairs(run_dir):
  tok = data.Tokenizer.load(run_dir / "model")
  examples = data.read_preference_jsonl(run_dir / "train.jsonl")[:3]
  return data.encode_preference(examples, tok, 20)


@pytest.fixture(scope="module")
def policy(run_dir):
  """The fixture in NF4 with LoRA whose B is random (not the reference)."""
  lm = models.from_pretrained(
    run_dir / "model", quant=QUANT, lora=LORA, with_tokenizer=False
  )
  trainable, frozen = qnn.split_trainable(lm.variables)
  keys = iter(jax.random.split(jax.random.key(1), 1000))
  trainable = jax.tree.map(
    lambda x: 0.05 * jax.random.normal(next(keys), x.shape, x.dtype),
    trainable,
  )
  return lm.model, trainable, frozen


def _numpy_logps(model, variables, batch):
  """[B, 2] summed log-probs and token counts, log-softmax in float64."""
  b, _, length = batch["input_ids"].shape
  logits = model.apply(
    variables,
    batch["input_ids"].reshape(-1, length),
    segment_ids=batch["segment_ids"].reshape(-1, length),
    positions=batch["positions"].reshape(-1, length),
  )
  z = np.asarray(logits, np.float64)
  z = z - z.max(-1, keepdims=True)
  logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
  t = batch["targets"].reshape(-1, length)
  m = batch["loss_mask"].reshape(-1, length).astype(np.float64)
  picked = np.take_along_axis(logp, t[..., None], -1)[..., 0]
  return (picked * m).sum(-1).reshape(b, 2), m.sum(-1).reshape(b, 2)


def _numpy_dpo(logps, ref, tokens, beta, kind, e):
  """(mean loss, d mean loss / d logps [B, 2]) in float64."""
  r = logps - ref
  n = len(r)
  if kind == "ipo":
    h = r[:, 0] / tokens[:, 0] - r[:, 1] / tokens[:, 1]
    loss = (h - 1 / (2 * beta)) ** 2
    dh = 2 * (h - 1 / (2 * beta))
    d = np.stack([dh / tokens[:, 0], -dh / tokens[:, 1]], 1)
  else:
    z = beta * (r[:, 0] - r[:, 1])
    sig = 1 / (1 + np.exp(-z))
    loss = (1 - e) * np.logaddexp(0, -z) + e * np.logaddexp(0, z)
    dz = -(1 - e) * (1 - sig) + e * sig
    d = np.stack([beta * dz, -beta * dz], 1)
  return loss.mean(), d / n


@pytest.mark.parametrize(
  "kind,beta,e", [("sigmoid", 0.5, 0.0), ("sigmoid", 2.0, 0.2), ("ipo", 0.3, 0)]
)
def test_loss_and_gradient_equal_numpy(policy, pairs, kind, beta, e):
  """The objective's loss against NumPy (log-softmax of the model's full
  logits in float64, DPO's formula); its gradient against NumPy's dL/dlogp
  times each answer's own log-prob gradient, taken through the SFT loss
  (sum of cross-entropy = -log p). Tolerance: 1e-5 relative (float32)."""
  model, trainable, frozen = policy
  variables = qnn.merge_trees(trainable, frozen)
  logps, tokens = _numpy_logps(model, variables, pairs)
  rng = np.random.default_rng(0)  # a reference near the policy
  ref = (logps + rng.normal(0, 1, logps.shape)).astype(np.float32)
  batch = dict(pairs, ref_logps=ref)
  objective = dpo.Dpo(DpoSettings(beta, kind, e))

  def mean_loss(p):
    s = objective.sums(model, p, frozen, batch, True)
    return s["loss"] / s["weight"]

  loss, grads = jax.jit(jax.value_and_grad(mean_loss))(trainable)
  want, d_logps = _numpy_dpo(logps, ref, tokens, beta, kind, e)
  assert float(loss) == pytest.approx(want, rel=1e-5)

  @jax.jit
  def logp_grad(p, row):  # d log p(answer) / d params, the SFT way
    return jax.grad(
      lambda q: (
        -losses.batch_sums(
          "causal_lm", model, q, row, True, None, frozen=frozen
        )["loss"]
      )
    )(p)

  expected = jax.tree.map(jnp.zeros_like, trainable)
  for i in range(3):
    for side in range(2):
      row = {k: pairs[k][i : i + 1, side] for k in data.LM_FIELDS}
      g = logp_grad(trainable, row)
      expected = jax.tree.map(
        lambda a, b, c=d_logps[i, side]: a + c * b, expected, g
      )
  flat_got = np.concatenate([np.ravel(x) for x in jax.tree.leaves(grads)])
  flat_want = np.concatenate([np.ravel(x) for x in jax.tree.leaves(expected)])
  scale = np.abs(flat_want).max()
  assert scale > 1e-4  # the gradient is not trivially zero
  np.testing.assert_allclose(flat_got, flat_want, rtol=0, atol=1e-5 * scale)


def test_adapters_off_log_probs_equal_the_base_exactly(run_dir, policy, pairs):
  """The reference (the LoRA model with adapters off, trained-looking
  random B included) equals the same NF4 model built without adapters,
  bit for bit; with adapters on it differs."""
  model, trainable, frozen = policy
  variables = qnn.merge_trees(trainable, frozen)
  base = models.from_pretrained(
    run_dir / "model", quant=QUANT, with_tokenizer=False
  )
  mesh = sharding.make_mesh(1, 1)
  ref = dpo.reference_logps(model, variables, pairs, 3, mesh)
  want = dpo.reference_logps(base.model, base.variables, pairs, 3, mesh)
  direct = jax.jit(lambda v, b: dpo.pair_logps(base.model, v, b, True)[0])
  np.testing.assert_array_equal(ref, want)
  np.testing.assert_array_equal(ref, np.asarray(direct(base.variables, pairs)))
  on = jax.jit(lambda v, b: dpo.pair_logps(model, v, b, True)[0])
  assert np.abs(np.asarray(on(variables, pairs)) - ref).max() > 1e-3


def _write(path, rows):
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))
  return path


def test_bad_pairs_are_named_by_file_and_line(run_dir, tmp_path):
  tok = data.Tokenizer.load(run_dir / "model")
  good = {"prompt": "the of", "chosen": "have had", "rejected": "she her"}
  cases = [
    ({"prompt": "the of", "chosen": "have"}, 'missing field "rejected"'),
    ({"prompt": "the", "rejected": "her"}, 'missing field "chosen"'),
    (dict(good, rejected="have had"), "are the same text"),
    ({"chosen": "a", "rejected": "b"}, 'missing field "prompt"'),
    (
      {
        "messages": [
          {"role": "user", "content": "the"},
          {"role": "assistant", "content": "of"},
        ],
        "chosen": "have",
        "rejected": "her",
      },
      '"messages" must end with a turn that is not the assistant',
    ),
    (
      {"messages": [], "chosen": "have", "rejected": "her"},
      "'messages' must be a non-empty list",
    ),
  ]
  for row, message in cases:
    path = _write(tmp_path / "bad.jsonl", [good, row])
    with pytest.raises(ValueError, match=f"bad.jsonl:2: .*{message}"):
      data.read_preference_jsonl(path)
  long = dict(good, prompt=" ".join(["the"] * 30))
  path = _write(tmp_path / "long.jsonl", [good, long])
  examples = data.read_preference_jsonl(path)
  with pytest.raises(ValueError, match="long.jsonl:2: the prompt takes 3[0-9]"):
    data.encode_preference(examples, tok, 20)
  # Answers that differ only past max_length are the same pair there.
  cut = dict(good, prompt=" ".join(["the"] * 8), rejected="have had she")
  path = _write(tmp_path / "cut.jsonl", [good, cut])
  examples = data.read_preference_jsonl(path)
  with pytest.raises(ValueError, match="cut.jsonl:2: .*same within"):
    data.encode_preference(examples, tok, 14)


SETTINGS_CASES = [
  ({"dpo.beta": 0.0}, "dpo.beta: must be finite and > 0"),
  ({"dpo.loss": "hinge"}, "dpo.loss: unknown value 'hinge'"),
  ({"dpo.loss": "ipo", "dpo.label_smoothing": 0.1}, "dpo.label_smoothing"),
  ({"dpo.label_smoothing": 0.5}, "dpo.label_smoothing: must be in [0, 0.5)"),
  ({"train.objective": "ppo"}, "train.objective: unknown value 'ppo'"),
  (
    {"train.mode": "full", "quant.data_type": "none"},
    "train.objective: 'dpo' takes its reference from the base",
  ),
  ({"lora.enabled": False}, "train.objective: 'dpo' takes its reference"),
  ({"lora.init": "pissa"}, "lora.init: 'pissa' starts the adapters away"),
  ({"data.packing": True}, "data.packing: train.objective 'dpo'"),
]


@pytest.mark.parametrize("overrides,message", SETTINGS_CASES)
def test_dpo_settings_are_checked_in_the_first_pass(
  run_dir, overrides, message
):
  c = tiny_dpo_config.get_config(str(run_dir))
  for key, value in overrides.items():
    section, field = key.split(".")
    setattr(c[section], field, value)
  with pytest.raises(ConfigError, match=re.escape(message)):
    Settings.from_config(c)


def test_a_run_recorded_before_dpo_reads_as_sft(run_dir):
  old = Settings.from_config(tiny_dpo_config.get_config(str(run_dir)))
  old = old.to_dict()
  del old["dpo"], old["train"]["objective"]
  s = Settings.from_config(recorded(old))
  assert s.train.objective == "sft" and s.dpo == DpoSettings(0.1, "sigmoid", 0)


@pytest.mark.parametrize("pairs_per_step,seq", [(3, 96), (2, 160)])
def test_memory_model_covers_a_dpo_step(pairs_per_step, seq):
  """XLA's compiled memory of the engine's DPO step (QLoRA NF4 + DQ, r=8,
  remat, scanned layers) within memory_test's 1.15x of the estimate for
  2 x pairs rows (a chosen and a rejected sequence per pair)."""
  config = memory_test._config(384, 3, 6, 2, 1024, 6000)
  lora, q, base, patterns = memory_test._mode("qlora_nf4_dq")
  spec = models.ModelSpec(config, "causal_lm")
  plan = models.model_plan(spec, lora, q, True)
  opts = models.Options(plan, jnp.float32, base, True, True)
  step = steps.abstract_step(
    spec,
    opts,
    batch=pairs_per_step,
    seq=seq,
    train_patterns=patterns,
    objective=dpo.Dpo(DpoSettings(0.1, "sigmoid", 0.0)),
  )
  got = profiling.compiled_memory(step.compile())["total"]
  p = memory_test._predict(
    config, "qlora_nf4_dq", 2 * pairs_per_step, seq, True
  )
  assert 1 / 1.15 <= got / p.total <= 1.15, (got, p)


def _losses(workdir, kind="train"):
  return {
    r["step"]: r
    for r in read_metrics(pathlib.Path(workdir) / "metrics.jsonl")
    if r["kind"] == kind
  }


@pytest.fixture(scope="module")
def straight(run_dir, tmp_path_factory):
  """The tiny DPO config's 16 steps, run here: (workdir, final metrics)."""
  workdir = tmp_path_factory.mktemp("straight")
  final = train.train_and_evaluate(
    tiny_dpo_config.get_config(str(run_dir)), str(workdir)
  )
  return workdir, final


def test_a_dpo_run_prefers_the_chosen_answers(straight):
  workdir, final = straight
  evals = _losses(workdir, "eval")
  assert sorted(evals) == [8, 16]
  # At step 0 policy = reference: loss ln 2, rewards 0. After 16 steps
  # the held-out pairs prefer their chosen answers.
  assert final["loss"] < 0.5 and final["accuracy"] == 1.0
  assert (
    final["margin"] > 0 and final["chosen_reward"] > final["rejected_reward"]
  )
  first = _losses(workdir)[1]
  assert first["loss"] == pytest.approx(np.log(2), abs=1e-6)
  assert first["margin"] == 0.0


def test_sigkill_then_resume_is_bit_identical(straight, run_dir, tmp_path):
  """The tiny config on the command line, checkpointing at every step,
  killed after a checkpoint and resumed here, logs the same numbers, step
  for step, as the straight run."""
  workdir, _ = straight
  killed = tmp_path / "killed"
  config = f"tests/tiny_dpo_config.py:{run_dir}"
  proc = kill_resume.run_cli(
    config, killed, "--config.train.checkpoint_every=1", wait=False
  )
  resumed_from = kill_resume.kill_after_checkpoint(proc, killed, 2)
  assert 2 <= resumed_from < 16
  resumed = tiny_dpo_config.get_config(str(run_dir))
  resumed.train.checkpoint_every = 1
  train.train_and_evaluate(resumed, str(killed))
  a, b = _losses(workdir), _losses(killed)
  assert sorted(a) == sorted(b) == list(range(1, 17))
  for step in a:
    for key in ("loss", "grad_norm", "margin", "chosen_reward"):
      assert a[step][key] == b[step][key], (step, key)
  assert _losses(workdir, "eval") == _losses(killed, "eval")
