"""Chat data: templates, conversations, the assistant-only loss, answers."""

import itertools
import json
import re
import shutil

import numpy as np
import pytest

from qlora_jax import data
from qlora_jax.data import chat
from qlora_jax.engine import answers
from tests import tiny_config

FIXTURE = "tests/data/hf/llama_gqa"
# A ChatML-like template over the fixture's word vocabulary (whitespace
# pre-tokenizer): every piece is its own token.
TEMPLATE = (
  "{% for m in messages %}<s> {{ m['role'] }} {{ m['content'] }} </s> "
  "{% endfor %}{% if add_generation_prompt %}<s> assistant {% endif %}"
)
CONVERSATION = [
  {"role": "user", "content": "the of"},
  {"role": "assistant", "content": "and to"},
  {"role": "user", "content": "in is"},
  {"role": "assistant", "content": "was for"},
]


@pytest.fixture(scope="module")
def tok():
  base = data.Tokenizer.load(FIXTURE)
  return data.Tokenizer(
    base._tok, base.special, chat_template=TEMPLATE
  )  # the fixture's vocabulary with a chat template


def test_render_is_the_template_with_trimmed_blocks():
  text = chat.render(TEMPLATE, CONVERSATION[:1], True)
  assert text == "<s> user the of </s> <s> assistant "
  # transformers' environment: blocks trimmed, tojson keeps unicode.
  t = "{% for m in messages %}\n{{ m['content'] | tojson }}\n{% endfor %}"
  assert chat.render(t, [{"role": "user", "content": "café"}]) == '"café"\n'
  with pytest.raises(chat.TemplateError, match="role 'robot'"):
    chat.render(TEMPLATE, [{"role": "robot", "content": "x"}])
  with pytest.raises(chat.TemplateError, match="raised: no system"):
    chat.render("{{ raise_exception('no system') }}", CONVERSATION)


def test_the_loss_covers_each_assistant_message_through_its_end(tok):
  doc = data.chat_document(data.ChatExample(tuple(CONVERSATION), "x:1"), tok)
  words = [tok.id_to_token(i) for i in doc.tokens]
  assert (
    words
    == (
      "<s> <unk> the of </s> <s> <unk> and to </s> "
      "<s> <unk> in is </s> <s> <unk> was for </s>"
    ).split()
  )  # "user" / "assistant" are not in the vocabulary
  want = [0] * 7 + [1, 1, 1] + [0] * 7 + [1, 1, 1]
  assert [int(v) for v in doc.loss_tokens] == want
  # Padded rows: position t predicts token t + 1 where that is a target.
  rows = data.arrays.padded_lm_arrays([doc], 24, tok.pad_id)
  targets = np.flatnonzero(rows["loss_mask"][0])
  np.testing.assert_array_equal(targets + 1, np.flatnonzero(want))
  # Packed with itself: the second copy's targets are shifted by its start.
  packed = data.arrays.packed_lm_arrays([doc, doc], 40, tok.pad_id)
  assert packed["segment_ids"][0].tolist() == [1] * 20 + [2] * 20
  assert packed["positions"][0].tolist() == list(range(20)) * 2
  got = np.flatnonzero(packed["loss_mask"][0]) + 1
  expected = np.flatnonzero(want + want)
  np.testing.assert_array_equal(got[:-1], expected[:-1])  # the last one
  # would predict past the row's end


def test_prompt_and_answer_stop_before_the_last_assistant_turn(tok):
  e = data.ChatExample(tuple(CONVERSATION), "x:1")
  ids, answer = data.prompt_and_answer(e, tok)
  assert answer == "was for"
  assert [tok.id_to_token(i) for i in ids][-3:] == ["</s>", "<s>", "<unk>"]
  # A prompt / completion row is one user turn and the answer.
  e = data.InstructionExample("the of", "and to", "x:2")
  ids, answer = data.prompt_and_answer(e, tok)
  assert answer == "and to"
  assert len(ids) == len("<s> user the of </s> <s> assistant".split())


def test_messages_rows_are_read_and_checked(tmp_path):
  path = tmp_path / "chat.jsonl"
  rows = [
    {"messages": CONVERSATION},
    {"prompt": "the", "completion": "of"},
  ]
  path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
  examples = data.read_examples(path, "instruction")
  assert isinstance(examples[0], data.ChatExample)
  assert isinstance(examples[1], data.InstructionExample)
  path.write_text(json.dumps({"messages": CONVERSATION[:1]}) + "\n")
  with pytest.raises(ValueError, match=r"chat.jsonl:1: no assistant message"):
    data.read_examples(path, "instruction")
  bad = [{"role": "user", "content": 3}]
  path.write_text(json.dumps({"messages": bad}) + "\n")
  with pytest.raises(ValueError, match=r"chat.jsonl:1: message 0 has no"):
    data.read_examples(path, "instruction")


def test_answers_compare_up_to_case_space_and_a_full_stop():
  assert answers.same_answer(" Asyncio.\n", "asyncio")
  assert not answers.same_answer("asyncio loop", "asyncio")
  assert answers.accuracy(
    ["xml", "http", "email"], ["xml", "xml", "email"]
  ) == (pytest.approx(2 / 3, abs=1e-12))


def test_a_folder_s_chat_template_is_read(tmp_path):
  folder = tmp_path / "hf"
  shutil.copytree(FIXTURE, folder)
  (folder / "tokenizer_config.json").write_text(
    json.dumps({"chat_template": TEMPLATE})
  )
  assert data.Tokenizer.load(folder).chat_template == TEMPLATE


def test_a_template_that_fails_names_the_row(tmp_path):
  base = data.Tokenizer.load(FIXTURE)
  broken = "{{ raise_exception('roles must alternate') }}"
  tok = data.Tokenizer(base._tok, base.special, chat_template=broken)
  e = data.ChatExample(tuple(CONVERSATION), "train.jsonl:7")
  with pytest.raises(ValueError, match="train.jsonl:7: .*roles must alternate"):
    data.chat_document(e, tok)


# SmolLM2-135M-Instruct's own template (its GGUF's tokenizer.chat_template)
# and one of whole words; both add a default system prompt when message 0
# is not a system message. Each with a pattern of one rendered turn:
# (role, text, then the end of the turn).
TURN_TEMPLATES = {
  "smollm2": (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] "
    "!= 'system' %}{{ '<|im_start|>system\nYou are a helpful AI assistant "
    "named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}{{'<|"
    "im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>"
    "' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>"
    "assistant\n' }}{% endif %}",
    r"<\|im_start\|>(\w+)\n(.*?)<\|im_end\|>\n",
  ),
  "words": (
    "{% for m in messages %}{% if loop.first and m['role'] != 'system' %}"
    "<s> system she had been </s> {% endif %}<s> {{ m['role'] }} "
    "{{ m['content'] }} </s> {% endfor %}"
    "{% if add_generation_prompt %}<s> assistant {% endif %}",
    r"<s> (\w+) (.*?) </s> ",
  ),
}
ROLE_ORDERS = [
  roles
  for n in range(1, 5)
  for roles in itertools.product(("system", "user", "assistant"), repeat=n)
  if "assistant" in roles
]


@pytest.mark.parametrize("name", sorted(TURN_TEMPLATES))
def test_only_assistant_text_carries_loss_in_every_role_order(name):
  # Reference: the rendered text's own turns, found by their pattern; a
  # token is a target exactly when it starts inside an assistant turn's
  # text or its end of turn. 90 orders: every sequence of up to 4 roles
  # with an assistant message, [assistant, user, assistant] among them.
  template, turn = TURN_TEMPLATES[name]
  base = data.Tokenizer.load(FIXTURE)
  tok = data.Tokenizer(base._tok, base.special, chat_template=template)
  words = tiny_config.FIRST + tiny_config.SECOND
  for roles in ROLE_ORDERS:
    messages = tuple(
      {"role": r, "content": f"{words[2 * k]} {words[2 * k + 1]}"}
      for k, r in enumerate(roles)
    )
    doc = data.chat_document(data.ChatExample(messages, "x:1"), tok)
    text = tok.apply_chat_template(messages, False)
    turns = list(re.finditer(turn, text, re.S))
    default_system = roles[0] != "system"
    assert [t.group(1) for t in turns] == (
      ["system"] * default_system + list(roles)
    )
    assert [t.group(2) for t in turns[default_system:]] == [
      m["content"] for m in messages
    ]
    spans = [(t.start(2), t.end()) for t in turns if t.group(1) == "assistant"]
    ids, starts = tok.encode_offsets(text)
    assert list(doc.tokens) == ids
    want = [any(a <= c < b for a, b in spans) for c in starts]
    assert [bool(v) for v in doc.loss_tokens] == want, roles
