"""A run's base is resolved once: the main job's setup resolves its
checkpoint, parses its model config and builds its tokenizer one time each.

Reference: counts of calls, by hand (1 each). The main job's own config
(configs/default.py) over the tiny Llama fixture (a Hugging Face
folder), which loads in a second where SmolLM2 takes a
minute; the named-checkpoint path ("smollm2") is one resolve as well.
"""

import collections
import pathlib

from configs import default
from qlora_jax import models
from qlora_jax.engine import setup, train
from qlora_jax.engine.settings import Settings
from qlora_jax.models import pretrained


def _counted(monkeypatch, calls, module, name):
  real = getattr(module, name)

  def wrapper(*args, **kwargs):
    calls[name] += 1
    return real(*args, **kwargs)

  monkeypatch.setattr(module, name, wrapper)


LLAMA = pathlib.Path(__file__).resolve().parent / "data" / "hf" / "llama_gqa"


def test_main_job_setup_resolves_its_checkpoint_once(monkeypatch, tmp_path):
  calls = collections.Counter()
  _counted(monkeypatch, calls, setup, "resolve_checkpoint")
  _counted(monkeypatch, calls, setup, "load_tokenizer")
  # The model config is parsed by these two, whoever asks for it.
  _counted(monkeypatch, calls, pretrained, "from_dict")
  _counted(monkeypatch, calls, pretrained, "read_config")
  # A GGUF tokenizer is built from the file's metadata by this one.
  _counted(monkeypatch, calls, models, "gguf_tokenizer")
  _counted(monkeypatch, calls, pretrained, "gguf_tokenizer")
  c = default.get_config()
  c.model.checkpoint = str(LLAMA)
  c.data.chat_template = "none"  # the tiny Llama has none
  c.data.questions_per_class = 1  # the data is not what is counted
  c.data.eval_questions_per_class = 1
  s, base = setup.check_run(Settings.from_config(c))
  run = train._set_up(s, base, tmp_path)
  assert calls == {
    "resolve_checkpoint": 1,
    "load_tokenizer": 1,
    "read_config": 1,
  }, calls
  assert base.path == LLAMA
  assert run.run_data.tokenizer is base.tokenizer


def test_a_named_checkpoint_resolves_once(monkeypatch):
  calls = collections.Counter()
  _counted(monkeypatch, calls, setup, "resolve_checkpoint")
  _counted(monkeypatch, calls, pretrained, "from_dict")
  _counted(monkeypatch, calls, models, "gguf_tokenizer")
  s, base = setup.check_run(Settings.from_config(default.get_config()))
  assert calls == {
    "resolve_checkpoint": 1,
    "from_dict": 1,
    "gguf_tokenizer": 1,
  }, calls
  assert base.path == models.smollm2_path()
  assert "<|im_start|>" in base.chat_template
