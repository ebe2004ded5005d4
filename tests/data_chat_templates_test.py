"""Built-in chat templates: their renderings written out by hand, their
end-of-turn tokens, and the refusals of templates a vocabulary lacks.

`tests/chat_templates_peers_test.py` checks the same renderings against
transformers' `apply_chat_template`.
"""

import json
import shutil

import pytest
import tokenizers

from qlora_jax import data
from qlora_jax.data import chat, chat_templates

LLAMA = "tests/data/hf/llama_gqa"
CONVERSATION = [
  {"role": "system", "content": "Be brief."},
  {"role": "user", "content": "Hi there"},
  {"role": "assistant", "content": " Hello! "},
  {"role": "user", "content": "Name a colour."},
  {"role": "assistant", "content": "Blue."},
]
SPECIALS = {"bos_token": "<bos>", "eos_token": "<eos>"}
# Each template on CONVERSATION, and on its first two turns after the
# system message with the generation prompt.
EXPECTED = {
  "chatml": (
    "<|im_start|>system\nBe brief.<|im_end|>\n"
    "<|im_start|>user\nHi there<|im_end|>\n"
    "<|im_start|>assistant\n Hello! <|im_end|>\n"
    "<|im_start|>user\nName a colour.<|im_end|>\n"
    "<|im_start|>assistant\nBlue.<|im_end|>\n",
    "<|im_start|>user\nHi there<|im_end|>\n"
    "<|im_start|>assistant\n Hello! <|im_end|>\n"
    "<|im_start|>assistant\n",
  ),
  # The system message opens the first user turn; text is trimmed.
  "gemma": (
    "<bos><start_of_turn>user\nBe brief.\n\nHi there<end_of_turn>\n"
    "<start_of_turn>model\nHello!<end_of_turn>\n"
    "<start_of_turn>user\nName a colour.<end_of_turn>\n"
    "<start_of_turn>model\nBlue.<end_of_turn>\n",
    "<bos><start_of_turn>user\nHi there<end_of_turn>\n"
    "<start_of_turn>model\nHello!<end_of_turn>\n"
    "<start_of_turn>model\n",
  ),
  "llama3": (
    "<bos><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
    "<|start_header_id|>user<|end_header_id|>\n\nHi there<|eot_id|>"
    "<|start_header_id|>assistant<|end_header_id|>\n\nHello!<|eot_id|>"
    "<|start_header_id|>user<|end_header_id|>\n\nName a colour.<|eot_id|>"
    "<|start_header_id|>assistant<|end_header_id|>\n\nBlue.<|eot_id|>",
    "<bos><|start_header_id|>user<|end_header_id|>\n\nHi there<|eot_id|>"
    "<|start_header_id|>assistant<|end_header_id|>\n\nHello!<|eot_id|>"
    "<|start_header_id|>assistant<|end_header_id|>\n\n",
  ),
}
END_OF_TURN = {"chatml": "<|im_end|>", "gemma": "<end_of_turn>"}
END_OF_TURN["llama3"] = "<|eot_id|>"


def with_tokens(tokens: list[str]) -> data.Tokenizer:
  """The tiny Llama's word tokenizer with `tokens` added as specials."""
  tok = tokenizers.Tokenizer.from_file(f"{LLAMA}/tokenizer.json")
  tok.add_special_tokens(
    [tokenizers.AddedToken(t, normalized=False, special=True) for t in tokens]
  )
  return data.Tokenizer(tok)


def tiny_gemma_with_turns(folder) -> str:
  """The tiny Gemma 3 fixture with Gemma's turn tokens in its vocabulary
  (in place of its last two words, so its embedding keeps 96 rows)."""
  shutil.copytree("tests/data/hf/gemma3_text", folder)
  path = folder / "tokenizer.json"
  spec = json.loads(path.read_text())
  vocab = spec["model"]["vocab"]
  for word, turn in (("both", "<start_of_turn>"), ("still", "<end_of_turn>")):
    token_id = vocab.pop(word)
    vocab[turn] = token_id
    spec["added_tokens"].append(
      {
        "id": token_id,
        "content": turn,
        "single_word": False,
        "lstrip": False,
        "rstrip": False,
        "normalized": False,
        "special": True,
      }
    )
  path.write_text(json.dumps(spec))
  return str(folder)


@pytest.mark.parametrize("name", sorted(chat_templates.BUILT_IN))
def test_built_in_templates_render_as_their_families_ship_them(name):
  text = chat_templates.BUILT_IN[name].text
  whole, prompt = EXPECTED[name]
  assert chat.render(text, CONVERSATION, False, SPECIALS) == whole
  assert chat.render(text, CONVERSATION[1:3], True, SPECIALS) == prompt


@pytest.mark.parametrize("name", sorted(chat_templates.BUILT_IN))
def test_the_end_of_turn_token_stops_generation(name):
  tok = with_tokens(list(chat_templates.BUILT_IN[name].tokens) + ["<bos>"])
  tok = chat_templates.resolve(name, tok, "data.chat_template")
  assert tok.chat_template == chat_templates.BUILT_IN[name].text
  eot = tok.token_to_id(END_OF_TURN[name])
  assert tok.end_of_turn_id == eot
  assert tok.stop_ids == (tok.end_id, eot)  # </s>, then the end of turn


def test_a_template_the_vocabulary_lacks_is_refused_naming_its_tokens():
  tok = with_tokens(["<start_of_turn>", "<end_of_turn>"])
  with pytest.raises(ValueError, match=r"data\.chat_template 'chatml'.*"
                     r"\['<\|im_start\|>', '<\|im_end\|>'\]"):  # fmt: skip
    chat_templates.resolve("chatml", tok, "data.chat_template")
  # A token in the vocabulary that the text would split is not one token.
  plain = data.Tokenizer.load(LLAMA)
  with pytest.raises(ValueError, match="'<start_of_turn>', '<end_of_turn>'"):
    chat_templates.resolve("gemma", plain, "data.chat_template")


def test_own_none_and_file_values(tmp_path):
  tok = with_tokens(["<|im_start|>", "<|im_end|>"])
  own = chat_templates.resolve("", tok, "f")
  assert own is tok and own.end_of_turn_id is None
  assert own.stop_ids == (tok.end_id,)
  chatml = chat_templates.resolve("chatml", tok, "f")
  assert chat_templates.resolve("none", chatml, "f").chat_template is None
  path = tmp_path / "t.jinja"
  path.write_text(chat_templates.BUILT_IN["chatml"].text)
  from_file = chat_templates.resolve(str(path), tok, "f")
  assert from_file.chat_template == chatml.chat_template
  assert from_file.end_of_turn_id == tok.token_to_id("<|im_end|>")
  with pytest.raises(ValueError, match="f: .*nowhere.jinja.*readable"):
    chat_templates.resolve(str(tmp_path / "nowhere.jinja"), tok, "f")
