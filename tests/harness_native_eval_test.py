"""The tasks run without lm-eval (harness.native) give lm-eval's numbers:
the shipped `stdlib_docstring_mc` on SmolLM2-135M-Instruct (NF4 + DQ, the
main job's base), its first 8 questions, with and without the chat
template, through `run_tasks` once natively and once through lm-eval
0.4.13's `simple_evaluate` with our `JaxLM`: acc, acc_norm and their
standard errors equal (the same log-likelihoods; the metrics computed by
two implementations). Marked `eval`: run where lm-eval is installed,
`.venv-peers/bin/python -m pytest tests/harness_native_eval_test.py`.
"""

import pathlib

import pytest

pytestmark = pytest.mark.eval
pytest.importorskip("lm_eval")

from qlora_jax.engine import tasks  # noqa: E402
from qlora_jax.harness import evaluate  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def model():
  return tasks.load_checkpoint("smollm2", quant="nf4", batch_size=16)


@pytest.mark.parametrize("chat", [False, True])
def test_native_equals_lm_eval(model, monkeypatch, chat):
  monkeypatch.chdir(ROOT)  # the task's data files are relative to it
  got = {}
  for backend in ("native", "lm_eval"):
    got[backend] = evaluate.run_tasks(
      model,
      ["stdlib_docstring_mc"],
      str(ROOT / "tasks"),
      backend=backend,
      limit=8,
      apply_chat_template=chat,
    )
  print(chat, got)
  assert set(got["native"]) == set(got["lm_eval"])
  for key, value in got["lm_eval"].items():
    assert got["native"][key] == pytest.approx(value, rel=1e-12, abs=0), key
