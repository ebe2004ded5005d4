"""Chat templates render under a time and size budget
(`data.template_limits`): a hostile template is stopped by name, a usual
one renders as before."""

import json
import shutil
import threading
import time

import pytest

from qlora_jax import data
from qlora_jax.data import chat, template_limits
from tests import tiny_config

# Two nested ranges of the sandbox's largest size: 10^10 steps, no output.
NESTED = (
  "{% for i in range(100000) %}{% for j in range(100000) %}"
  "{% endfor %}{% endfor %}{{ messages[0]['content'] }}"
)
MESSAGES = [{"role": "user", "content": "hi"}]


@pytest.fixture
def short_budget(monkeypatch):
  monkeypatch.setattr(template_limits, "MAX_SECONDS", 0.3)
  monkeypatch.setattr(template_limits, "POLL", 0.05)


def test_nested_loops_stop_at_the_deadline_naming_the_source(
  short_budget, tmp_path
):
  folder = tmp_path / "llama"
  shutil.copytree(tiny_config.ROOT / "data/hf/llama_gqa", folder)
  config = folder / "tokenizer_config.json"
  config.write_text(json.dumps({"chat_template": NESTED}))
  tok = data.Tokenizer.from_folder(folder)
  start = time.perf_counter()
  with pytest.raises(chat.TemplateError) as e:
    tok.apply_chat_template(MESSAGES, True)
  assert time.perf_counter() - start < 5  # 0.3 s, seen within a poll
  assert str(e.value).startswith(f"{config} chat_template: ")
  assert "ran for more than 0.3 s" in str(e.value)
  # The stopped rendering left nothing pending: the thread goes on.
  assert chat.render("{{ messages[0]['content'] }}", MESSAGES) == "hi"
  time.sleep(0.2)
  assert chat.render("{{ messages[0]['content'] }}", MESSAGES) == "hi"


def test_a_stopped_rendering_in_another_thread(short_budget):
  errors = []

  def work():
    try:
      chat.render(NESTED, MESSAGES, source="worker")
    except chat.TemplateError as e:
      errors.append(str(e))

  thread = threading.Thread(target=work)
  thread.start()
  thread.join(timeout=10)
  assert not thread.is_alive()
  assert errors and errors[0].startswith("worker: ")


def test_output_and_products_are_bounded(monkeypatch):
  monkeypatch.setattr(template_limits, "MAX_CHARS", 1000)
  loud = "{% for i in range(100) %}{{ 'abcdefghijklmnop' }}{% endfor %}"
  with pytest.raises(chat.TemplateError, match="output passed 1,000 char"):
    chat.render(loud, MESSAGES)
  with pytest.raises(chat.TemplateError, match="'\\*' would build 2,000"):
    chat.render("{{ 'ab' * 1000 }}", MESSAGES)
  with pytest.raises(chat.TemplateError, match="'\\*\\*' would build"):
    chat.render("{{ 10 ** 1000000 }}", MESSAGES)
  # Within the budget, the same operations.
  assert chat.render("{{ 'ab' * 3 }}{{ 2 ** 10 }}", MESSAGES) == "ababab1024"


def test_a_usual_template_renders_as_before():
  template = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
  )
  got = chat.render(template, MESSAGES, add_generation_prompt=True)
  assert got == "<|user|>hi\n<|assistant|>"
