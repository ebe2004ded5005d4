"""The built-in chat templates rendered by us and by transformers.

Reference: transformers 5.24.0's `apply_chat_template(tokenize=False)` on
a `PreTrainedTokenizerFast` holding the template, over multi-turn
conversations with and without a system message, with and without the
generation prompt: the texts must be identical. Skipped without the
peers extra.
"""

import pytest

transformers = pytest.importorskip("transformers")

from qlora_jax.data import chat, chat_templates  # noqa: E402
from tests.data_chat_templates_test import with_tokens  # noqa: E402

pytestmark = pytest.mark.peers

SPECIALS = {"bos_token": "<bos>", "eos_token": "<eos>"}
TURNS = [
  "Hi there",
  " Hello! How can I help? ",
  "What is 2 + 2?\nShow your work.",
  "4, since 2 + 2 = 4.",
  "Thanks — and 3 × 3?",
  "9.",
]
CONVERSATIONS = [
  [
    {"role": "user" if i % 2 == 0 else "assistant", "content": t}
    for i, t in enumerate(TURNS[:n])
  ]
  for n in (1, 2, 4, 6)
]
CONVERSATIONS += [
  [{"role": "system", "content": "Answer in one line."}] + c
  for c in CONVERSATIONS
]


@pytest.fixture(scope="module", params=sorted(chat_templates.BUILT_IN))
def pair(request):
  name = request.param
  ours = with_tokens(list(chat_templates.BUILT_IN[name].tokens))
  theirs = transformers.PreTrainedTokenizerFast(
    tokenizer_object=ours._tok, **SPECIALS
  )
  theirs.chat_template = chat_templates.BUILT_IN[name].text
  return name, theirs


@pytest.mark.parametrize("generation_prompt", [False, True])
def test_renderings_equal_transformers(pair, generation_prompt):
  name, theirs = pair
  text = chat_templates.BUILT_IN[name].text
  for messages in CONVERSATIONS:
    if generation_prompt and messages[-1]["role"] == "assistant":
      messages = messages[:-1]
    want = theirs.apply_chat_template(
      messages, tokenize=False, add_generation_prompt=generation_prompt
    )
    got = chat.render(text, messages, generation_prompt, SPECIALS)
    assert got == want, (name, messages)


def test_gemma_refuses_roles_out_of_turn_as_transformers_does(pair):
  name, theirs = pair
  if name != "gemma":
    pytest.skip("only Gemma's template checks the order of roles")
  messages = [
    {"role": "user", "content": "a"},
    {"role": "user", "content": "b"},
  ]
  with pytest.raises(Exception, match="must alternate"):
    theirs.apply_chat_template(messages, tokenize=False)
  with pytest.raises(chat.TemplateError, match="must alternate"):
    chat.render(chat_templates.BUILT_IN[name].text, messages, False, SPECIALS)
