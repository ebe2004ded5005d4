"""A base model given a built-in chat template (data.chat_template): the
tiny Gemma 3 with Gemma's turn tokens trains on conversations, its run
records the template, predictions stop at `<end_of_turn>`, and its merged
export carries the template; configs the template cannot serve are
refused naming data.chat_template; turn tokens with near-zero embedding
rows are named in a warning."""

import json
import logging

import numpy as np
import pytest

from qlora_jax.data import chat_templates
from qlora_jax.engine import export, predict, setup, train, turn_tokens
from qlora_jax.engine.settings import Settings
from qlora_jax.models import generation
from tests import tiny_config
from tests.data_chat_templates_test import tiny_gemma_with_turns, with_tokens

QUESTIONS = ["the of", "and to", "in is", "was for"]
ANSWERS = ["that with as", "by at from", "it an be", "this are or"]


def _config(tmp_path, checkpoint: str, template: str):
  config = tiny_config.get_config(str(tmp_path))
  config.model.checkpoint = checkpoint
  config.model.task = "causal_lm"
  config.data.instruction = True
  config.data.chat_template = template
  config.data.max_length = 32
  return config


def _write_conversations(folder) -> None:
  rows = [
    {
      "messages": [
        {"role": "user", "content": q},
        {"role": "assistant", "content": a},
      ]
    }
    for q, a in zip(QUESTIONS, ANSWERS, strict=True)
  ]
  for name in ("train", "eval"):
    (folder / f"{name}.jsonl").write_text(
      "".join(json.dumps(r) + "\n" for r in rows)
    )


def test_a_base_with_a_named_template_trains_and_stops_at_its_turn_end(
  tmp_path,
):
  checkpoint = tiny_gemma_with_turns(tmp_path / "gemma")
  _write_conversations(tmp_path)
  config = _config(tmp_path, checkpoint, "gemma")
  config.train.mode = "full"
  config.quant.data_type = "none"
  config.train.batch_size = 4
  config.train.steps = 40
  config.train.eval_every = 40
  config.train.show_predictions = 0
  config.opt.learning_rate = 1e-2
  workdir = tmp_path / "run"
  train.train_and_evaluate(config, str(workdir))
  recorded = json.loads((workdir / "config.json").read_text())
  assert recorded["data"]["chat_template"] == "gemma"

  predictor = predict.load(workdir)  # restored from config.json
  tok = predictor.tokenizer
  eot = tok.token_to_id("<end_of_turn>")
  assert tok.chat_template == chat_templates.BUILT_IN["gemma"].text
  assert eot in tok.stop_ids
  # Without the end of turn as a stop, the model writes it after the
  # answer and goes on; with it, the answer ends there.
  lm = predictor.run.lm
  ids = np.asarray(predict.prompt_ids(tok, QUESTIONS[:1]), np.int32)
  new = generation.generate(
    lm.model,
    lm.variables,
    ids,
    np.ones_like(ids),
    max_new_tokens=6,
    eos_token_id=[],
  )
  row = [int(i) for i in np.asarray(new)[0]]
  assert tok.decode(row[:3]) == ANSWERS[0] and row[3] == eot, row
  answers = predict.complete(predictor, QUESTIONS, max_new_tokens=6)
  assert answers == ANSWERS

  out = tmp_path / "merged"
  export.export_merged(workdir, out)
  tok_config = json.loads((out / "tokenizer_config.json").read_text())
  assert tok_config["chat_template"] == chat_templates.BUILT_IN["gemma"].text
  gen_config = json.loads((out / "generation_config.json").read_text())
  assert gen_config["eos_token_id"] == [tok.end_id, eot]


def _check(config):
  return setup.check_run(Settings.from_config(config))


def test_instruction_data_without_a_template_is_refused(tmp_path):
  _write_conversations(tmp_path)
  llama = str(tiny_config.ROOT / "data/hf/llama_gqa")  # has no template
  with pytest.raises(ValueError, match=r"data\.chat_template: .* no chat"):
    _check(_config(tmp_path, llama, ""))
  _check(_config(tmp_path, llama, "none"))  # said outright: plain text


def test_a_template_the_base_cannot_write_is_refused(tmp_path):
  _write_conversations(tmp_path)
  gemma = tiny_gemma_with_turns(tmp_path / "gemma")
  with pytest.raises(ValueError, match=r"'llama3'.*'<\|start_header_id\|>'"):
    _check(_config(tmp_path, gemma, "llama3"))
  with pytest.raises(ValueError, match=r"data\.chat_template: no file .*x\."):
    _check(_config(tmp_path, gemma, "x.jinja"))
  s, base = _check(_config(tmp_path, gemma, "gemma"))
  assert base.tokenizer.end_of_turn_id == 95


def test_untrained_turn_tokens_are_named_in_a_warning(caplog):
  tok = chat_templates.resolve(
    "chatml",
    with_tokens(["<|im_start|>", "<|im_end|>"]),
    "data.chat_template",
  )
  rng = np.random.default_rng(0)
  table = rng.normal(size=(tok.vocab_size, 8)).astype(np.float32)
  table[tok.token_to_id("<|im_end|>")] = 1e-4  # as a base that never saw it
  variables = {"base": {"model": {"embed_tokens": {"embedding": table}}}}
  with caplog.at_level(logging.WARNING):
    turn_tokens.warn_untrained(variables, tok, "chatml")
  (record,) = caplog.records
  assert "['<|im_end|>']" in record.getMessage()
  assert "embed_tokens" in record.getMessage()
  caplog.clear()
  table[tok.token_to_id("<|im_end|>")] = table[4]  # trained
  turn_tokens.warn_untrained(variables, tok, "chatml")
  assert not caplog.records
