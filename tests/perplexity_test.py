"""Table 6's machinery: held-out text, windows, perplexity, KL, resume."""

import json
import math

import jax.numpy as jnp
import numpy as np
import pytest

from qlora_jax import models, quant
from qlora_jax.ablations import corpora, perplexity, quant_error
from qlora_jax.ablations.results import DONE
from qlora_jax.engine import setup

LLAMA = "tests/data/hf/llama_gqa"
BERT = "tests/data/hf/bert"
SOURCES = {
  "words": "the of and to in is was for on that with as by at from it " * 60,
  "code": "def f(x):\n    return x * 2  # doubled\n\n" * 60,
}
SCORING = perplexity.Scoring(window=16, tokens=50, kl_tokens=20, batch=2)
SETTINGS = [quant_error.Setting("nf2"), quant_error.Setting("int8", 64, True)]


def _log_softmax(x):
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


def test_scoring_rounds_windows_up_to_whole_batches_and_checks_fields():
  # tokens 50 over 15 scored per window -> 4 windows (already 2 batches);
  # kl 20 -> 2 windows.
  assert (SCORING.windows, SCORING.kl_windows) == (4, 2)
  s = perplexity.Scoring(window=11, tokens=31, kl_tokens=500, batch=4)
  assert s.windows == 4 * math.ceil(math.ceil(31 / 10) / 4) == 4
  assert s.kl_windows == s.windows  # never more than the scored windows
  with pytest.raises(ValueError, match="scoring.window"):
    perplexity.Scoring(window=1)
  with pytest.raises(ValueError, match="scoring.batch"):
    perplexity.Scoring(batch=0)


def test_windows_are_the_token_stream_cut_in_order():
  tok = setup.load_tokenizer(setup.resolve_checkpoint(LLAMA))
  text = SOURCES["code"]
  w = perplexity.token_windows(tok, text, "code", SCORING)
  stream = tok.encode_batch([text], add_special_tokens=False)[0]
  assert w.shape == (4, 16) and w.dtype == np.int32
  np.testing.assert_array_equal(w.reshape(-1), stream[:64])
  with pytest.raises(ValueError, match="'short'.*tokens, 64 needed"):
    perplexity.token_windows(tok, "def f", "short", SCORING)


@pytest.fixture(scope="module")
def table(tmp_path_factory):
  out = tmp_path_factory.mktemp("table6")
  spec = perplexity.table_spec(list(SOURCES))
  lines = []
  results = perplexity.run_table(
    LLAMA, SETTINGS, SOURCES, out, spec, SCORING, lines.append
  )
  return out, results, lines


def test_perplexity_and_kl_equal_a_direct_numpy_computation(table):
  """Independent reference: full logits of each window from the model,
  log-softmax and KL in float64 NumPy (tolerance: float32 sums, 1e-5)."""
  out, results, _ = table
  tok = setup.load_tokenizer(setup.resolve_checkpoint(LLAMA))
  base = models.from_pretrained(LLAMA, task="causal_lm")
  spec = models.ModelSpec(base.config, "causal_lm")
  weights = {
    p: w
    for p, w in quant_error.linear_weights(base.variables).items()
    if p not in spec.heads
  }
  _, quantized = quant_error.weight_errors(weights, SETTINGS[0])
  qmodel, qvars = quant_error.quantized_model(
    spec, base.variables, quantized, SETTINGS[0]
  )
  slugs = json.loads((out / "order.json").read_text())
  assert len(slugs) == 1 + len(SETTINGS)
  for name, text in SOURCES.items():
    w = perplexity.token_windows(tok, text, name, SCORING)
    ids = jnp.asarray(w)
    ref = _log_softmax(
      np.asarray(
        base.model.apply(base.variables, ids, jnp.ones_like(ids))
      ).astype(np.float64)[:, :-1]
    )
    got = _log_softmax(
      np.asarray(qmodel.apply(qvars, ids, jnp.ones_like(ids))).astype(
        np.float64
      )[:, :-1]
    )
    target = w[:, 1:, None]
    for logp, slug in ((ref, slugs[0]), (got, slugs[1])):
      nll = -np.take_along_axis(logp, target, -1).mean()
      m = results[slug]
      assert m[f"scored_tokens_{name}"] == 4 * 15
      np.testing.assert_allclose(m[f"nll_{name}"], nll, rtol=1e-5)
      np.testing.assert_allclose(
        m[f"perplexity_{name}"], math.exp(nll), rtol=1e-5
      )
    k = SCORING.kl_windows
    p, q = ref[:k], got[:k]
    kl = (np.exp(p) * (p - q)).sum(-1).mean()
    agree = (p.argmax(-1) == q.argmax(-1)).mean()
    m = results[slugs[1]]
    np.testing.assert_allclose(m[f"kl_{name}"], kl, rtol=1e-4, atol=1e-7)
    assert m[f"top1_agreement_{name}"] == pytest.approx(agree, abs=1e-12)
    assert results[slugs[0]][f"kl_{name}"] == 0.0
  # Bits: float32 as held; nf2 by formula (2 bits + one f32 absmax per 64).
  assert results[slugs[0]]["bits_per_param"] == 32.0
  assert results[slugs[1]]["bits_per_param"] == pytest.approx(2 + 32 / 64)
  # More bits, closer to float: int8 + DQ's KL far below nf2's.
  for name in SOURCES:
    assert results[slugs[2]][f"kl_{name}"] < results[slugs[1]][f"kl_{name}"]


def test_points_render_and_a_rerun_resumes_without_recomputing(table):
  out, results, lines = table
  assert len(lines) == 3 and all("bits/param, ppl words" in x for x in lines)
  slugs = json.loads((out / "order.json").read_text())
  for slug in slugs:
    assert (
      json.loads((out / "points" / slug / DONE).read_text()) == (results[slug])
    )
  # Drop one point's result: only it runs again, and comes out the same.
  (out / "points" / slugs[2] / DONE).unlink()
  again = []
  res2 = perplexity.run_table(
    LLAMA,
    SETTINGS,
    SOURCES,
    out,
    perplexity.table_spec(list(SOURCES)),
    SCORING,
    again.append,
  )
  assert [x.endswith("done before") for x in again] == [True, True, False]
  for key, value in results[slugs[2]].items():
    assert res2[slugs[2]][key] == pytest.approx(value, rel=1e-6), key
  spec = json.loads((out / "table.json").read_text())
  assert ["perplexity_code", "ppl code", "f3"] in spec["metrics"]


def test_an_encoder_is_refused(tmp_path):
  with pytest.raises(ValueError, match="needs a decoder"):
    perplexity.run_table(BERT, SETTINGS, SOURCES, tmp_path, {}, SCORING)


def test_chatterbot_yaml_becomes_turns_and_bad_files_are_named():
  doc = (
    "categories:\n- AI\nconversations:\n- - What is AI?\n  - A field.\n"
    "- - Hi\n  - Hello\n  - 42\n- A lone line\n"
  )
  text = corpora.conversations_text(doc, "ai.yml")
  assert text == "What is AI?\nA field.\n\nHi\nHello\n42\n\nA lone line"
  with pytest.raises(ValueError, match="bad.yml: no 'conversations'"):
    corpora.conversations_text("categories: [x]\n", "bad.yml")
  with pytest.raises(ValueError, match=r"bad.yml: conversations\[0\]"):
    corpora.conversations_text("conversations:\n- {a: 1}\n", "bad.yml")
  with pytest.raises(ValueError, match="bad.yml: not YAML"):
    corpora.conversations_text("conversations: [\n", "bad.yml")


def test_stdlib_source_reads_the_modules_in_order(tmp_path):
  for i, name in enumerate(corpora.STDLIB_MODULES):
    (tmp_path / f"{name}.py").write_text(f"# {i}\n")
  text = corpora.stdlib_source(tmp_path)
  want = "\n\n".join(f"# {i}\n" for i in range(len(corpora.STDLIB_MODULES)))
  assert text == want
  (tmp_path / "csv.py").unlink()
  with pytest.raises(FileNotFoundError, match="csv.py"):
    corpora.stdlib_source(tmp_path)
  real = corpora.stdlib_source()  # the running interpreter's library
  assert "class ArgumentParser" in real and "def dedent" in real


def test_read_source_takes_a_file_or_a_name(tmp_path):
  f = tmp_path / "notes.txt"
  f.write_text("some text")
  assert corpora.read_source(str(f)) == ("notes", "some text")
  with pytest.raises(ValueError, match="neither a file nor one of"):
    corpora.read_source(str(tmp_path / "missing.txt"))


def test_float_row_is_the_loaded_weights_unchanged(table):
  """The float row quantizes nothing: its weight error is 0 and its
  parameter count is every non-head linear weight of the checkpoint."""
  out, results, _ = table
  slug = json.loads((out / "order.json").read_text())[0]
  base = models.from_pretrained(LLAMA, task="causal_lm")
  spec = models.ModelSpec(base.config, "causal_lm")
  n = sum(
    int(w.size)
    for p, w in quant_error.linear_weights(base.variables).items()
    if p not in spec.heads
  )
  assert results[slug]["quantized_params"] == n
  assert results[slug]["weight_relative_error"] == 0.0
  assert (
    quant.get_data_type("int8").bits
    == results[json.loads((out / "order.json").read_text())[2]]["bits"]
  )


def test_cli_scores_text_files_with_a_config_of_its_own(tmp_path):
  """`experiments.quant_error --text FILE` end to end in a subprocess."""
  import subprocess
  import sys

  config = tmp_path / "ppl.py"
  config.write_text(
    "from ml_collections import config_dict\n"
    "def get_config():\n"
    "  c = config_dict.ConfigDict()\n"
    "  c.checkpoint = 'tests/data/hf/llama_gqa'\n"
    "  c.sources = ['stdlib_source']\n"
    "  c.scoring = config_dict.ConfigDict(\n"
    "    {'window': 16, 'tokens': 30, 'kl_tokens': 15, 'batch': 2})\n"
    "  c.settings = [{'data_type': 'nf4', 'block_size': 64,\n"
    "                 'double_quant': True}]\n"
    "  return c\n"
  )
  text = tmp_path / "code.txt"
  text.write_text(SOURCES["code"])
  out = tmp_path / "run"
  cmd = [
    sys.executable,
    "-m",
    "experiments.quant_error",
    f"--config={config}",
    f"--text={text}",
    f"--workdir={out}",
  ]
  r = subprocess.run(cmd, capture_output=True, text=True, check=False)
  assert r.returncode == 0, r.stderr[-3000:]
  lines = r.stdout.strip().splitlines()
  assert len(lines) == 2 and "ppl code" in lines[1], r.stdout
  slugs = json.loads((out / "order.json").read_text())
  m = json.loads((out / "points" / slugs[1] / DONE).read_text())
  assert set(m) >= {"perplexity_code", "kl_code", "top1_agreement_code"}
  assert "perplexity_stdlib_source" not in m  # --text replaced the sources
