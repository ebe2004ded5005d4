"""Local multiple-choice tasks without lm-eval (harness.native), on the
tiny Llama fixture: each choice's log-likelihood computed here by hand
from the model's full float64 logits over the jointly encoded text, acc /
acc_norm as lm-eval 0.4.13 defines them, standard errors by the formula.
Tasks only lm-eval can run are refused naming the task and the field.
(`tests/harness_native_eval_test.py` checks the same numbers against
lm-eval itself where it is installed.)"""

import json
import math
import pathlib
import shutil

import numpy as np
import pytest

from qlora_jax import models
from qlora_jax.engine import setup, tasks
from qlora_jax.harness import evaluate, native
from tests.data_chat_test import TEMPLATE

HF = pathlib.Path(__file__).parent / "data" / "hf"
QUESTIONS = ["the of and", "to in is", "was for on", "that with as"]
OPTIONS = [["have", "had one"], ["were", "they their"], ["all", "has been"]]


def _write_task(folder: pathlib.Path, docs, **fields) -> None:
  data = folder / "docs.jsonl"
  data.write_text("".join(json.dumps(d) + "\n" for d in docs))
  config = {
    "task": "tiny_mc",
    "dataset_path": "json",
    "dataset_kwargs": {"data_files": {"test": str(data)}},
    "output_type": "multiple_choice",
    "test_split": "test",
    "doc_to_text": "Q: {{q}}\nA:",
    "doc_to_choice": "options",
    "doc_to_target": "label",
    "metric_list": [{"metric": "acc"}, {"metric": "acc_norm"}],
    **fields,
  }
  (folder / "tiny_mc.yaml").write_text(json.dumps(config))  # YAML too


@pytest.fixture(scope="module")
def model(tmp_path_factory):
  folder = tmp_path_factory.mktemp("llama") / "hf"
  shutil.copytree(HF / "llama_gqa", folder)
  (folder / "tokenizer_config.json").write_text(
    json.dumps({"chat_template": TEMPLATE})
  )
  lm = models.from_pretrained(folder, with_tokenizer=False)
  tok = setup.load_tokenizer(folder)
  return (
    lm,
    tok,
    tasks.text_model(
      lm.model, lm.variables, lm.config, tok, "tiny", batch_size=3
    ),
  )


def _by_hand(lm, tok, context: str, continuation: str) -> float:
  """log p(continuation | context): the pair encoded jointly (the BOS
  first), split at the context's length, scored from float64 logits."""
  whole = tok.encode(context + continuation, add_special_tokens=True)
  n = len(tok.encode(context, add_special_tokens=True))
  logits = np.asarray(lm.model.apply(lm.variables, np.array([whole[:-1]])))
  logits = logits[0].astype(np.float64)
  logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  return float(sum(logp[i - 1, whole[i]] for i in range(n, len(whole))))


def _stderr(xs):
  mu = sum(xs) / len(xs)
  return math.sqrt(sum((x - mu) ** 2 for x in xs) / (len(xs) - 1) / len(xs))


@pytest.mark.parametrize("chat", [False, True])
def test_acc_and_acc_norm_equal_a_hand_computation(model, tmp_path, chat):
  lm, tok, text_model = model
  docs, want = [], {"acc": [], "acc_norm": []}
  for i, q in enumerate(QUESTIONS * 2):
    options = OPTIONS[i % 3]
    context = f"Q: {q}\nA:"
    if chat:  # the user turn and the generation prompt; no delimiter
      context = tok.apply_chat_template(
        [{"role": "user", "content": context}], True
      )
    lls = np.array(
      [_by_hand(lm, tok, context, ("" if chat else " ") + o) for o in options]
    )
    best = int(np.argmax(lls))
    best_norm = int(np.argmax(lls / [len(o) for o in options]))
    # Right on even documents, wrong on odd ones: acc is exactly 0.5.
    label = best if i % 2 == 0 else (best + 1) % len(options)
    docs.append({"q": q, "options": options, "label": label})
    want["acc"].append(float(label == best))
    want["acc_norm"].append(float(label == best_norm))
  _write_task(tmp_path, docs)
  got = evaluate.run_tasks(
    text_model,
    ["tiny_mc"],
    str(tmp_path),
    backend="native",
    apply_chat_template=chat,
  )
  assert got["tiny_mc/acc"] == 0.5
  for metric, values in want.items():
    assert got[f"tiny_mc/{metric}"] == sum(values) / len(values)
    assert got[f"tiny_mc/{metric}_stderr"] == pytest.approx(
      _stderr(values), rel=1e-12
    )
  # lm-eval's limit: the first documents only.
  first = evaluate.run_tasks(
    text_model,
    ["tiny_mc"],
    str(tmp_path),
    backend="native",
    limit=2,
    apply_chat_template=chat,
  )
  assert first["tiny_mc/acc"] == 0.5  # one right, one wrong


def test_targets_as_text_templates_and_choice_lists(tmp_path):
  docs = [{"q": "a", "answer": "had"}, {"q": "b", "answer": "1"}]
  _write_task(
    tmp_path,
    docs,
    doc_to_choice=["have", "had"],
    doc_to_target="{{answer}}",
  )
  task = native.load("tiny_mc", tmp_path)
  # A choice's text gives its index; a number's text is the index itself.
  assert [task.gold(d) for d in docs] == [1, 1]
  assert task.text(docs[0]) == "Q: a\nA:"
  assert task.choices(docs[0]) == ["have", "had"]


@pytest.mark.parametrize(
  "fields, named",
  [
    (dict(output_type="generate_until"), "output_type 'generate_until'"),
    (dict(num_fewshot=3), "num_fewshot"),
    (dict(process_docs="!function utils.process"), "'process_docs'"),
    (dict(metric_list=[{"metric": "f1"}]), "metrics ['f1']"),
    (dict(filter_list=[]), "'filter_list'"),
    (dict(dataset_path="hellaswag"), "local JSON"),
  ],
)
def test_tasks_only_lm_eval_runs_are_named(tmp_path, fields, named):
  _write_task(tmp_path, [{"q": "a", "options": ["x"], "label": 0}], **fields)
  yaml_file = tmp_path / "tiny_mc.yaml"
  if "process_docs" in fields:  # a real `!function` tag, not a string
    text = yaml_file.read_text().replace(
      '"!function utils.process"', "!function utils.process"
    )
    yaml_file.write_text(text)
  with pytest.raises(native.Unsupported) as e:
    evaluate.resolve_backend("native", ["tiny_mc"], str(tmp_path))
  assert "'tiny_mc'" in str(e.value) and named in str(e.value)
  assert "tiny_mc.yaml" in str(e.value)


def test_without_lm_eval_auto_says_what_to_install(tmp_path, monkeypatch):
  monkeypatch.setattr(evaluate, "has_lm_eval", lambda: False)
  _write_task(tmp_path, [{"q": "a", "options": ["x"], "label": 0}])
  assert evaluate.resolve_backend("auto", ["tiny_mc"], str(tmp_path)) == (
    "native"
  )
  for backend, tasks_ in (("auto", ["hellaswag"]), ("lm_eval", ["tiny_mc"])):
    with pytest.raises(ImportError) as e:
      evaluate.resolve_backend(backend, tasks_, str(tmp_path))
    assert "pip install lm-eval==0.4.13" in str(e.value)
  with pytest.raises(ImportError, match="few-shot"):
    evaluate.resolve_backend("auto", ["tiny_mc"], str(tmp_path), 3)
