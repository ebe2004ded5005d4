"""The engine on the main job's own config and on language modelling."""

import collections
import json
import math
import os
import pathlib
import re
import shutil
import subprocess
import sys

import pytest

from qlora_jax.engine import tasks, train
from qlora_jax.engine.metrics import read_metrics
from qlora_jax.harness import evaluate
from tests import tiny_config

ROOT = pathlib.Path(__file__).resolve().parent.parent

# The main job's report, part by part, in order (one regex per line kind).
REPORT = [
  ("summary", r"devices +1 x cpu \(1 process\(es\)\), mesh data 1 x fsdp 1"),
  ("summary", r"base model +minilm \(bert\): 22\.57M parameters"),
  ("summary", r"loaded +101 tensors in [\d.]+ s, peak RSS [\d,]+ MiB"),
  (
    "summary",
    r"linear layers +36 with adapters, 36 quantized \(nf4, block 64 \+ "
    r"double quant\)",
  ),
  ("summary", r"trainable +0\.33M of 22\.90M \(1\.46%\), mode lora"),
  ("summary", r"base bytes +90\.3 MB as floats -> 53\.3 MB stored"),
  ("summary", r"linear layers +42\.5 MB -> 5\.5 MB \(4\.127 bits/param\)"),
  ("summary", r"layer plan +\S+/plan\.txt"),
  ("table", r" +step +train loss +eval loss +eval acc"),
  ("table", r" +\d+/\d+ +[\d.]+ +[\d.]+ +[\d.]+"),
  ("predictions", r"predictions \(eval\):"),
  ("predictions", r"  (ok |err) \w+ +\(label \w+ *\) .+"),
  ("final", r"final eval: loss [\d.]+, accuracy [\d.]+"),
  ("paths", r"checkpoints: \S+/checkpoints"),
  ("paths", r"metrics: +\S+/metrics\.jsonl \(\+ tensorboard/\)"),
  ("paths", r"curves: +\S+/curves\.png"),
  ("paths", r"predictions: \S+/predictions\.jsonl"),
]


def _report_parts(stdout: str) -> list[str]:
  """The part of each stdout line, failing on a line of no known kind."""
  parts = []
  for line in stdout.splitlines():
    kinds = [k for k, pattern in REPORT if re.fullmatch(pattern, line)]
    assert kinds, f"unexpected stdout line: {line!r}"
    parts.append(kinds[0])
  return parts


def _run_at_level_1(cmd):
  """Runs `cmd` (a training job that runs more than it compiles) at LLVM
  level 1 instead of the tests' 0, asserting that it succeeds."""
  env = dict(os.environ)
  env["XLA_FLAGS"] = re.sub(
    r"(--xla_backend_optimization_level=)0\b", r"\g<1>1", env["XLA_FLAGS"]
  )
  proc = subprocess.run(
    cmd, cwd=ROOT, env=env, capture_output=True, text=True, check=False
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  return proc


def test_minilm_job_shrunk_prints_its_report_and_learns(tmp_path):
  # The MiniLM classifier through the command line, 20 steps instead of
  # ~215, on docstrings cut to 32 tokens (accuracy 0.53; 75 s on 2 shared
  # cores): stdout is the report and nothing else, no log record anywhere.
  # Scanned blocks: one block compiles instead of six (6 s, not 23 s).
  workdir = tmp_path / "run"
  cmd = [
    sys.executable,
    "-m",
    "experiments.train",
    "--config=configs/minilm_docstrings.py",
    "--config.train.steps=20",
    "--config.train.eval_every=20",
    "--config.model.scan_layers=True",
    "--config.data.max_length=32",
    f"--workdir={workdir}",
  ]
  # This job runs more than it compiles: at the tests' LLVM level 0
  # (tests/conftest.py) it takes twice as long (~100 s) as at level 1
  # (~50 s, as fast as XLA's default level), so it runs at level 1.
  proc = _run_at_level_1(cmd)
  parts = _report_parts(proc.stdout)
  order = ["summary", "table", "predictions", "final", "paths"]
  assert sorted(set(parts), key=order.index) == order
  assert parts == sorted(parts, key=order.index)  # parts in this order
  assert parts.count("summary") == 8 and parts.count("paths") == 4
  assert parts.count("predictions") == 1 + 6  # train.show_predictions
  # absl records look like "I1201 12:00:00.000000 ..."; there are none.
  for line in (proc.stdout + proc.stderr).splitlines():
    assert not re.match(r"[IWE]\d{4} ", line), line
  labels = json.loads((workdir / "labels.json").read_text())
  assert len(labels) == 8
  rows = [
    json.loads(line)
    for line in (workdir / "predictions.jsonl").read_text().splitlines()
  ]
  assert len(rows) == 360  # every eval example, once
  # Learning, against baselines computed here: the eval loss is below that
  # of the uniform prediction (ln 8), and the accuracy is over 3x that of
  # always answering the most common eval label.
  final = json.loads((workdir / "final_metrics.json").read_text())
  counts = collections.Counter(r["label"] for r in rows)
  majority = max(counts.values()) / len(rows)
  assert final["loss"] < math.log(len(labels))
  assert final["accuracy"] > 3 * majority, (final, majority)
  right = sum(r["label"] == r["predicted"] for r in rows) / len(rows)
  assert right == pytest.approx(final["accuracy"], abs=1e-12)


def _lm_files(folder, instruction=False):
  words = tiny_config.FIRST + tiny_config.SECOND
  with (folder / "train.jsonl").open("w") as f:
    for i in range(40):
      text = " ".join(words[(i + j) % len(words)] for j in range(6))
      if instruction:
        f.write(json.dumps({"prompt": text, "completion": " " + text}) + "\n")
      else:
        f.write(json.dumps({"text": text}) + "\n")
  (folder / "eval.jsonl").write_text(
    (folder / "train.jsonl").read_text().split("\n", 8)[0] + "\n"
  )


@pytest.mark.parametrize("instruction,packing", [(False, True), (True, False)])
def test_language_modelling_learns(tmp_path, instruction, packing):
  _lm_files(tmp_path, instruction)
  config = tiny_config.get_config(str(tmp_path))
  config.model.checkpoint = str(tiny_config.ROOT / "data/hf/llama_gqa")
  config.model.task = "causal_lm"
  config.data.packing = packing
  config.data.instruction = instruction
  config.data.chat_template = "none"  # the base has none: plain text
  config.data.max_length = 16
  config.train.steps = 16
  config.train.eval_every = 8
  config.opt.learning_rate = 1e-2
  final = train.train_and_evaluate(config, str(tmp_path / "run"))
  evals = [
    r
    for r in read_metrics(tmp_path / "run" / "metrics.jsonl")
    if r["kind"] == "eval"
  ]
  assert [r["step"] for r in evals] == [8, 16]
  assert "perplexity" in final
  # Memorising 40 short cyclic texts: the eval loss falls.
  assert evals[1]["loss"] < evals[0]["loss"]


def test_bad_configs_name_the_field(tmp_path):
  tiny_config.write_dataset(tmp_path)
  cases = [
    ("train.mode", lambda c: setattr(c.train, "mode", "qlora")),
    ("quant.data_type", lambda c: setattr(c.train, "mode", "full")),
    ("model.dtype", lambda c: setattr(c.model, "dtype", "float8")),
    ("data.source", lambda c: setattr(c.data, "source", "csv")),
    ("model.checkpoint", lambda c: setattr(c.model, "checkpoint", "nowhere")),
    ("model.task", lambda c: setattr(c.model, "task", "regression")),
    ("train.batch_size", lambda c: setattr(c.train, "batch_size", 7)),
    ("lora.targets", lambda c: setattr(c.lora, "targets", "nothing_matches")),
    ("opt.schedule", lambda c: setattr(c.opt, "schedule", "step")),
    ("mesh", lambda c: setattr(c.mesh, "fsdp", 3)),
  ]
  for field, mutate in cases:
    config = tiny_config.get_config(str(tmp_path))
    config.train.grad_accum = 2
    mutate(config)
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
      train.train_and_evaluate(config, str(tmp_path / "run"))


def test_instruction_tuning_answers_by_generation(tmp_path):
  # The tiny Llama with a chat template: prompts are rendered as a user
  # turn, accuracy is measured by generating before training (step 0) and
  # at each evaluation.
  from tests.data_chat_test import TEMPLATE  # noqa: PLC0415

  folder = tmp_path / "llama"
  shutil.copytree(tiny_config.ROOT / "data/hf/llama_gqa", folder)
  (folder / "tokenizer_config.json").write_text(
    json.dumps({"chat_template": TEMPLATE})
  )
  words = tiny_config.FIRST + tiny_config.SECOND
  rows = [
    {
      "prompt": f"{words[i % 20]} {words[(i + 3) % 20]}",
      "completion": words[i % 7],
    }
    for i in range(24)
  ]
  for name, part in (("train", rows), ("eval", rows[:6])):
    (tmp_path / f"{name}.jsonl").write_text(
      "".join(json.dumps(r) + "\n" for r in part)
    )
  config = tiny_config.get_config(str(tmp_path))
  config.model.checkpoint = str(folder)
  config.model.task = "causal_lm"
  config.data.instruction = True
  config.data.max_length = 16
  config.data.eval_generate = 6
  config.data.max_new_tokens = 3
  config.train.steps = 4
  config.train.eval_every = 4
  # An lm-eval multiple-choice task over the same words, run natively at
  # each evaluation (zero-shot row included), with the chat template.
  task_dir = tmp_path / "tasks"
  task_dir.mkdir()
  docs = [
    {"prompt": r["prompt"], "answer": words.index(r["completion"])}
    for r in rows[:6]
  ]
  (task_dir / "docs.jsonl").write_text(
    "".join(json.dumps(d) + "\n" for d in docs)
  )
  (task_dir / "words.yaml").write_text(
    json.dumps(
      {
        "task": "tiny_words",
        "dataset_path": "json",
        "dataset_kwargs": {
          "data_files": {"test": str(task_dir / "docs.jsonl")}
        },
        "output_type": "multiple_choice",
        "test_split": "test",
        "doc_to_text": "{{prompt}}",
        "doc_to_choice": words[:7],
        "doc_to_target": "answer",
        "metric_list": [{"metric": "acc"}, {"metric": "acc_norm"}],
      }
    )
  )
  config.eval.tasks = ("tiny_words",)
  config.eval.include_path = str(task_dir)
  config.eval.apply_chat_template = True
  config.eval.backend = "native"
  final = train.train_and_evaluate(config, str(tmp_path / "run"))
  evals = [
    r
    for r in read_metrics(tmp_path / "run" / "metrics.jsonl")
    if r["kind"] == "eval"
  ]
  assert [r["step"] for r in evals] == [0, 4]  # zero-shot, then trained
  for key in ("tiny_words/acc", "tiny_words/acc_norm", "tiny_words/acc_stderr"):
    assert all(key in r for r in evals), key
  # The last row is what experiments.evaluate's loading of the finished
  # run (its base with the unmerged adapters) scores, exactly.
  restored = tasks.load_run(str(tmp_path / "run"))
  again = evaluate.run_tasks(
    restored,
    ["tiny_words"],
    str(task_dir),
    backend="native",
    apply_chat_template=True,
  )
  assert again == {k: v for k, v in evals[1].items() if "/" in k}
  assert final["tiny_words/acc"] == evals[1]["tiny_words/acc"]
  lines = (tmp_path / "run" / "predictions.jsonl").read_text().splitlines()
  said = [json.loads(line) for line in lines]
  assert [r["answer"] for r in said] == [r["completion"] for r in rows[:6]]
  right = sum(r["generated"].strip() == r["answer"] for r in said) / 6
  assert final["answer_accuracy"] == pytest.approx(right, abs=1e-12)
  summary = json.loads((tmp_path / "run" / "final_metrics.json").read_text())
  assert summary["zero_shot_answer_accuracy"] == evals[0]["answer_accuracy"]
  assert summary["zero_shot_tiny_words/acc"] == evals[0]["tiny_words/acc"]


def test_main_job_shrunk_instruction_tunes_smollm2(tmp_path):
  # configs/default.py (the real SmolLM2 GGUF in NF4 + DQ, LoRA on all 210
  # linear layers) through the command line for 2 steps of 4 on 8
  # questions, 8 others answered by generation; its lm-eval task on 2 of
  # its 80 questions (16 of its 640 requests). Like the MiniLM job above it
  # runs more than it compiles, so at LLVM level 1 (51 s here against 83 s
  # at the tests' level 0, on 2 CPU cores).
  cmd = [
    sys.executable,
    "-m",
    "experiments.train",
    "--config=configs/default.py",
    "--config.data.questions_per_class=1",
    "--config.train.batch_size=4",
    "--config.data.eval_questions_per_class=1",
    "--config.data.eval_generate=8",
    "--config.train.steps=2",
    "--config.train.eval_every=2",
    "--config.eval.limit=2",
    f"--workdir={tmp_path}",
  ]
  out = _run_at_level_1(cmd).stdout
  final = json.loads((tmp_path / "final_metrics.json").read_text())
  assert (
    "210 with adapters, 210 quantized (nf4, block 64 + double quant)" in out
  )
  assert "1.22M of 135.74M (0.90%)" in out
  assert "predictions (eval): prompt -> generated answer" in out
  evals = [
    r for r in read_metrics(tmp_path / "metrics.jsonl") if r["kind"] == "eval"
  ]
  assert [r["step"] for r in evals] == [0, 2]  # zero-shot, then tuned
  for r in evals:  # 0, 1/2 or 1: the share of 2 questions answered right
    assert r["stdlib_docstring_mc/acc"] in (0.0, 0.5, 1.0), r
  assert final["stdlib_docstring_mc/acc"] == evals[1]["stdlib_docstring_mc/acc"]
  # Two steps on the answers alone already lower the eval loss on them.
  assert evals[1]["loss"] < evals[0]["loss"]
  rows = [
    json.loads(line)
    for line in (tmp_path / "predictions.jsonl").read_text().splitlines()
  ]
  assert len(rows) == 8
  assert {r["answer"] for r in rows} <= set(data_packages())
  right = sum(
    r["generated"].strip().rstrip(".").lower() == r["answer"] for r in rows
  )
  assert final["answer_accuracy"] == pytest.approx(right / 8, abs=1e-12)


def data_packages():
  from qlora_jax.data.stdlib_docstrings import PACKAGES  # noqa: PLC0415

  return PACKAGES
