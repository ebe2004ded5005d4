"""Predictions of trained runs (qlora_jax.predict, experiments.predict)."""

import copy
import json
import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest

from qlora_jax.data.readers import read_records
from qlora_jax.engine import predict, train
from tests import tiny_config

ROOT = pathlib.Path(__file__).resolve().parent.parent
WORDS = tiny_config.FIRST + tiny_config.SECOND


@pytest.fixture(scope="module")
def classifier(tmp_path_factory):
  """The tiny BERT classification run (nf4 + LoRA), 4 steps."""
  return tiny_config.train_classifier(tmp_path_factory, steps=4, n_eval=11)


@pytest.fixture(scope="module")
def language_model(tmp_path_factory):
  """The tiny Llama (nf4 + LoRA) tuned on prompt/completion pairs."""
  data_dir = tmp_path_factory.mktemp("lm_data")
  with (data_dir / "train.jsonl").open("w") as f:
    for i in range(16):
      text = " ".join(WORDS[(i + j) % len(WORDS)] for j in range(4))
      f.write(json.dumps({"prompt": text, "completion": " " + text}) + "\n")
  (data_dir / "eval.jsonl").write_text(
    (data_dir / "train.jsonl").read_text().split("\n", 4)[0] + "\n"
  )
  config = tiny_config.get_config(str(data_dir))
  config.model.checkpoint = str(tiny_config.ROOT / "data/hf/llama_gqa")
  config.model.task = "causal_lm"
  config.data.instruction = True
  config.data.chat_template = "none"  # the base has none: plain text
  config.data.max_length = 16
  config.train.steps = 4
  config.train.eval_every = 4
  config.opt.learning_rate = 1e-2
  workdir = tmp_path_factory.mktemp("lm_run")
  train.train_and_evaluate(config, str(workdir))
  return predict.load(workdir)


def test_file_predictions_equal_the_runs_own_evaluation(classifier, tmp_path):
  workdir, eval_file, final = classifier
  predictor = predict.load(workdir)
  out = tmp_path / "out.jsonl"
  # 11 rows in batches of 4: the last batch is padded.
  summary = predict.predict_file(predictor, eval_file, out, batch_size=4)
  assert summary["rows"] == summary["labelled"] == 11
  # The accuracy over the file is the run's final eval accuracy (exact:
  # the same 11 right or wrong answers).
  assert summary["accuracy"] == pytest.approx(final["accuracy"], abs=1e-12)
  got = [json.loads(line) for line in out.read_text().splitlines()]
  want = [
    json.loads(line)
    for line in (workdir / "predictions.jsonl").read_text().splitlines()
  ]
  assert [g["text"] for g in got] == [w["text"] for w in want]
  assert [g["label"] for g in got] == [w["label"] for w in want]
  assert [g["predicted"] for g in got] == [w["predicted"] for w in want]
  # Same model, other batch shapes: float32 agreement to 1e-6.
  np.testing.assert_allclose(
    [g["probability"] for g in got],
    [w["probability"] for w in want],
    atol=1e-6,
  )
  for g in got:
    probs = g["probabilities"]
    assert sorted(probs) == ["first", "second"]
    assert sum(probs.values()) == pytest.approx(1.0, abs=1e-6)
    assert probs[g["predicted"]] == g["probability"]


def test_classify_is_independent_of_batching(classifier):
  predictor = predict.load(classifier[0])
  texts = [" ".join(WORDS[i : i + 3 + i % 4]) for i in range(7)]
  one = predict.classify(predictor, texts, batch_size=1)
  many = predict.classify(predictor, texts, batch_size=5)
  assert [a["predicted"] for a in one] == [b["predicted"] for b in many]
  np.testing.assert_allclose(
    [a["probability"] for a in one],
    [b["probability"] for b in many],
    atol=1e-6,
  )


def _reference_greedy(predictor, prompt: str, max_new_tokens: int) -> str:
  """Greedy decoding by re-running the whole sequence each step (no KV
  cache, no left padding): an independent path to the same tokens. Rows
  are right-padded to one length (causal attention: the padding cannot
  change the logits before it), so that the forward pass compiles once."""
  ids = predict.prompt_ids(predictor.tokenizer, [prompt])[0]
  return _reference_greedy_ids(predictor, ids, max_new_tokens)


def _reference_greedy_ids(predictor, ids: list[int], max_new_tokens: int):
  """`_reference_greedy` of a prompt given as token ids."""
  tok = predictor.tokenizer
  lm = predictor.run.lm
  apply = jax.jit(lm.model.apply)
  width = len(ids) + max_new_tokens
  new = []
  for _ in range(max_new_tokens):
    seq = ids + new
    row = np.zeros((1, width), np.int32)
    row[0, : len(seq)] = seq
    segments = (np.arange(width) < len(seq)).astype(np.int32)[None]
    logits = apply(lm.variables, row, segment_ids=segments)
    token = int(np.argmax(np.asarray(logits)[0, len(seq) - 1]))
    if token == tok.end_id:
      break
    new.append(token)
  return tok.decode(new)


def test_greedy_completions_match_full_recomputation(language_model):
  prompts = ["the of and to", "have had", "in is was for on that"]
  # One batch of left-padded prompts of three lengths.
  got = predict.complete(language_model, prompts, max_new_tokens=6)
  want = [_reference_greedy(language_model, p, 6) for p in prompts]
  assert got == want
  assert any(got)  # the tuned model says something


def test_a_prompt_longer_than_the_context_keeps_its_end(language_model, caplog):
  # The tiny Llama has 64 positions: 6 new tokens leave room for 58.
  long = " ".join(WORDS[i % len(WORDS)] for i in range(200))
  ids = predict.prompt_ids(language_model.tokenizer, [long])[0]
  assert len(ids) > 100
  (got,) = predict.complete(language_model, [long], max_new_tokens=6)
  assert got == _reference_greedy_ids(language_model, ids[-58:], 6)
  assert (
    "1 prompt(s) longer than the model's 64-token context less 6 new (58 "
    f"tokens; the longest has {len(ids)})" in caplog.text
  )
  with pytest.raises(ValueError, match="max_new_tokens 64 leaves no room"):
    predict.complete(language_model, ["the of"], max_new_tokens=64)


def test_sampling_is_seeded(language_model):
  kwargs = dict(max_new_tokens=5, temperature=1.0, top_k=20)
  a = predict.complete(language_model, ["the of", "have"], seed=3, **kwargs)
  b = predict.complete(language_model, ["the of", "have"], seed=3, **kwargs)
  assert a == b


def test_wrong_task_and_bad_lines_are_named(
  classifier, language_model, tmp_path
):
  with pytest.raises(ValueError, match="causal_lm run"):
    predict.complete(predict.load(classifier[0]), ["x"])
  with pytest.raises(ValueError, match="classification run"):
    predict.classify(language_model, ["x"])
  bad = tmp_path / "in.jsonl"
  bad.write_text('{"text": "fine"}\n\n{"label": "first"}\n')
  with pytest.raises(ValueError, match=rf'{bad}:3: missing field "text"'):
    read_records(bad, ("text",))
  bad.write_text('{"prompt": 3}\n')
  with pytest.raises(ValueError, match=rf'{bad}:1: field "prompt" must be a'):
    read_records(bad, ("prompt", "text"))


def test_command_line(classifier):
  workdir = classifier[0]
  cmd = [
    sys.executable,
    "-m",
    "experiments.predict",
    f"--workdir={workdir}",
    "--text=the of and to in",
    "--text=she her when they",
  ]
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
  assert proc.returncode == 0, proc.stderr[-3000:]
  lines = [json.loads(x) for x in proc.stdout.strip().splitlines()]
  want = predict.classify(
    predict.load(workdir), ["the of and to in", "she her when they"]
  )
  assert [x["predicted"] for x in lines] == [w["predicted"] for w in want]
  np.testing.assert_allclose(
    [x["probability"] for x in lines],
    [w["probability"] for w in want],
    atol=1e-6,
  )


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory):
  """The tiny Llama with a chat template, tuned on prompt/completion pairs
  rendered as chat turns."""
  import shutil  # noqa: PLC0415

  from tests.data_chat_test import TEMPLATE  # noqa: PLC0415

  root = tmp_path_factory.mktemp("chat")
  folder = root / "llama"
  shutil.copytree(tiny_config.ROOT / "data/hf/llama_gqa", folder)
  (folder / "tokenizer_config.json").write_text(
    json.dumps({"chat_template": TEMPLATE})
  )
  with (root / "train.jsonl").open("w") as f:
    for i in range(16):
      text = " ".join(WORDS[(i + j) % len(WORDS)] for j in range(3))
      f.write(json.dumps({"prompt": text, "completion": text}) + "\n")
  (root / "eval.jsonl").write_text((root / "train.jsonl").read_text())
  config = tiny_config.get_config(str(root))
  config.model.checkpoint = str(folder)
  config.model.task = "causal_lm"
  config.data.instruction = True
  config.data.max_length = 24
  config.train.steps = 4
  config.opt.learning_rate = 1e-2
  train.train_and_evaluate(config, str(root / "run"))
  return root / "run"


def test_chat_streams_what_batched_generation_gives(chat_model):
  p = predict.load(chat_model)
  messages = [{"role": "user", "content": "the of and"}]
  streamed = "".join(predict.chat_reply(p, messages, max_new_tokens=6))
  # The same prompt through batched greedy generation (complete renders a
  # prompt as one user turn with the template, as chat does).
  (batched,) = predict.complete(p, ["the of and"], max_new_tokens=6)
  assert streamed == batched
  # The command line: a line in, the streamed answer out, an empty line
  # ends. Then a line that is not UTF-8 (was a TypeError) and far longer
  # than the model's 64 positions (SmolLM2: 45.9 GB asked for): answered,
  # with a warning for each.
  long = " ".join(WORDS[i % len(WORDS)] for i in range(2000))
  proc = subprocess.run(
    [
      sys.executable,
      "-m",
      "experiments.predict",
      f"--workdir={chat_model}",
      "--chat",
      "--max_new_tokens=6",
    ],
    cwd=ROOT,
    input=b"the of and\nthe \xff\xfe " + long.encode() + b"\n\n",
    capture_output=True,
    check=False,
    env=dict(os.environ, JAX_PLATFORMS="cpu"),
  )
  out, err = proc.stdout.decode(), proc.stderr.decode()
  assert proc.returncode == 0, err[-2000:]
  assert out.startswith(
    f"chat with the fine-tuned model (an empty line ends it)\n> {streamed}\n> "
  )
  assert out.count("\n> ") == 3 and out.endswith("\n> ")  # 2 answers
  assert (
    "warning: the input is not valid UTF-8 (invalid start byte at byte 4): "
    "such bytes read as U+FFFD"
  ) in err
  assert "1 conversation(s) longer than the model's 64-token context" in err


def test_all_empty_completions_are_warned_of(language_model, caplog):
  prompts = ["the of and to", "have had", "in is was for on that"]
  predict.complete(language_model, prompts, max_new_tokens=6)  # compiled
  assert "completions are empty" not in caplog.text
  # The checkpoint of a run that diverged: with NaN weights every greedy
  # token is <pad> (argmax of NaN logits), a special token decoded to "".
  broken = copy.copy(language_model)
  broken.run = copy.copy(language_model.run)
  broken.run.lm = copy.copy(language_model.run.lm)
  variables = dict(broken.run.lm.variables)
  variables["params"] = jax.tree.map(
    lambda v: np.full(v.shape, np.nan, v.dtype), variables["params"]
  )
  broken.run.lm.variables = variables
  assert predict.complete(broken, prompts, max_new_tokens=6) == [""] * 3
  assert "all 3 completions are empty" in caplog.text


def test_base_is_the_run_with_its_adapters_zeroed(language_model, classifier):
  # Reference: the trained run with every lora_b set to zero, LoRA's own
  # init, under which the adapters add exactly nothing. The two programs
  # differ (one has no adapter ops), so XLA may order the base matmul's
  # sums differently: float32 agreement to 1e-6 of the largest logit.
  from qlora_jax import nn as qnn  # noqa: PLC0415

  workdir = language_model.workdir
  base = predict.load(workdir, base=True)
  zeroed = predict.load(workdir)
  flat = qnn.flatten(zeroed.run.lm.variables)
  assert any(p[-1] == "lora_b" for p in flat)
  zeroed.run.lm.variables = qnn.unflatten(
    {p: np.zeros_like(v) if p[-1] == "lora_b" else v for p, v in flat.items()}
  )
  ids = np.array([predict.prompt_ids(base.tokenizer, [WORDS[0]])[0]])

  def logits(p):
    lm = p.run.lm
    return np.asarray(jax.jit(lm.model.apply)(lm.variables, ids))

  want, got = logits(zeroed), logits(base)
  np.testing.assert_allclose(got, want, atol=1e-6 * np.abs(want).max())
  # The trained adapters do change the logits: --base is not the run.
  trained = logits(language_model)
  assert np.abs(trained - want).max() > 1e-3 * np.abs(want).max()
  prompts = [" ".join(WORDS[i : i + 3]) for i in range(4)]
  assert predict.complete(base, prompts, max_new_tokens=4) == (
    predict.complete(zeroed, prompts, max_new_tokens=4)
  )
  # A classifier's head trains with its adapters: no base to give.
  with pytest.raises(ValueError, match="--base needs a LoRA run.*model.task"):
    predict.load(classifier[0], base=True)
