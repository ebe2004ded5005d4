"""Parity of our lm-eval backend with lm-eval's Hugging Face backend.

SmolLM2-135M-Instruct in float32, converted to a Hugging Face folder as
experiments.convert converts it, runs the local tasks of tasks/ (one of
each output type) through lm-eval 0.4.13's `HFLM` on that folder and
through `harness.backend.JaxLM`: per-request log-likelihoods agree within
1e-4 (relative), is_greedy and greedy generations are identical, and so
are the metrics (perplexities within 1e-4, relative).

`.venv-peers/bin/python -m pytest -s tests/harness_peers_test.py` on 2
shared CPU cores, 2026-12-07 (commit 7ed20a2), 3 documents a task, the
choices of a question scored over their shared context's KV cache and its
one-token answers over one shared row: worst relative log-likelihood
difference 7.7e-6 (0-shot), 9.1e-6 (3-shot), 1.1e-5 (chat template,
0-shot), 5.2e-5 (chat template, 3-shot); about 29 minutes in all beside
other jobs.
"""

import math
import pathlib

import pytest

pytestmark = [pytest.mark.peers, pytest.mark.eval]
lm_eval = pytest.importorskip("lm_eval")
pytest.importorskip("transformers")

from qlora_jax import models  # noqa: E402
from qlora_jax.engine import export, tasks  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
TASKS = ["stdlib_docstring_mc", "stdlib_docstring_gen", "stdlib_source_ppl"]
LIMIT = 3
RTOL = 1e-4


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
  out = tmp_path_factory.mktemp("smollm2") / "hf"
  return export.convert_gguf(str(models.smollm2_path()), str(out), "float32")


def _run(lm, chat: bool, shots: int):
  from lm_eval.tasks import TaskManager

  return lm_eval.simple_evaluate(
    model=lm,
    tasks=TASKS,
    num_fewshot=shots,
    limit=LIMIT,
    apply_chat_template=chat,
    log_samples=True,
    task_manager=TaskManager(include_path=str(ROOT / "tasks")),
  )


def _responses(results, task):
  samples = sorted(results["samples"][task], key=lambda s: s["doc_id"])
  return [[r[0] for r in s["resps"]] for s in samples]


def _close(a: float, b: float) -> bool:
  return abs(a - b) <= RTOL * max(abs(a), abs(b))


@pytest.mark.parametrize(
  "chat, shots", [(False, 0), (True, 3), (False, 3), (True, 0)]
)
def test_matches_hf_backend(folder, monkeypatch, chat, shots):
  from lm_eval.models.huggingface import HFLM

  from qlora_jax.harness.backend import JaxLM

  monkeypatch.chdir(ROOT)  # the tasks' data files are relative to it
  theirs = _run(
    HFLM(pretrained=str(folder), dtype="float32", device="cpu", batch_size=8),
    chat,
    shots,
  )
  lm = JaxLM(tasks.load_checkpoint(str(folder)))
  ours = _run(lm, chat, shots)
  worst, differ = 0.0, []
  for task in TASKS:
    want, got = _responses(theirs, task), _responses(ours, task)
    assert len(want) == len(got) == LIMIT
    for doc, (w, g) in enumerate(zip(want, got, strict=True)):
      for w1, g1 in zip(w, g, strict=True):
        if isinstance(w1, str):
          if w1 != g1:
            differ.append((task, doc, w1, g1))
          continue
        w_ll, g_ll = (
          (w1[0], g1[0])
          if isinstance(w1, tuple | list)
          else (
            w1,
            g1,
          )
        )
        worst = max(worst, abs(w_ll - g_ll) / max(abs(w_ll), 1e-30))
        if not _close(w_ll, g_ll):
          differ.append((task, doc, w1, g1))
        if isinstance(w1, tuple | list) and bool(w1[1]) != bool(g1[1]):
          differ.append((task, doc, "is_greedy", w1, g1))
    for metric, value in theirs["results"][task].items():
      if not isinstance(value, float) or "stderr" in metric:
        continue
      mine = ours["results"][task][metric]
      print(f"{task} {metric}: HF {value:.6g}, ours {mine:.6g}")
      if "perplexity" in metric or "bits" in metric:
        assert _close(value, mine), (task, metric, value, mine)
      else:
        assert value == mine, (task, metric, value, mine)
  print(f"chat={chat} shots={shots}: worst relative difference {worst:.2e}")
  assert not differ, differ
  assert math.isfinite(worst)
