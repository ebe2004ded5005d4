"""The tokenizer wrapper, on tiny tokenizers built here with `tokenizers`."""

import json

import numpy as np
import pytest
import tokenizers
from tokenizers import models, pre_tokenizers, processors

from qlora_jax.data.tokenizer import SpecialTokens, Tokenizer

WORDS = ["the", "cat", "sat", "on", "mat"]


def _word_level(specials, template=None):
  """Word-level tokenizer: specials get ids 0.., then WORDS."""
  vocab = {t: i for i, t in enumerate([*specials, *WORDS])}
  unk = next(t for t in specials if "unk" in t.lower())
  tok = tokenizers.Tokenizer(models.WordLevel(vocab, unk_token=unk))
  tok.pre_tokenizer = pre_tokenizers.Whitespace()
  tok.add_special_tokens(list(specials))
  if template:
    tok.post_processor = processors.TemplateProcessing(
      single=template,
      special_tokens=[(t, vocab[t]) for t in specials if t in template],
    )
  return tok


def bert_like():
  """[PAD]=0 [UNK]=1 [CLS]=2 [SEP]=3, then the=4 cat=5 sat=6 on=7 mat=8."""
  return _word_level(["[PAD]", "[UNK]", "[CLS]", "[SEP]"], "[CLS] $A [SEP]")


def llama_like():
  """<unk>=0 <s>=1 </s>=2, no pad token; <s> before each text."""
  return _word_level(["<unk>", "<s>", "</s>"], "<s> $A")


def _save_folder(folder, tok, **configs):
  folder.mkdir()
  tok.save(str(folder / "tokenizer.json"))
  for name, value in configs.items():
    (folder / f"{name}.json").write_text(json.dumps(value))
  return folder


def test_bert_special_tokens_are_found_and_added(tmp_path):
  path = tmp_path / "tokenizer.json"
  bert_like().save(str(path))
  tok = Tokenizer.load(path)
  assert tok.special == SpecialTokens(
    pad=0, bos=None, eos=None, cls=2, sep=3, unk=1
  )
  assert tok.pad_id == 0 and tok.end_id == 3
  assert tok.vocab_size == 9
  assert tok.encode("the cat sat") == [2, 4, 5, 6, 3]
  assert tok.encode("the cat sat", add_special_tokens=False) == [4, 5, 6]
  assert tok.special_prefix == (2,) and tok.special_suffix == (3,)
  assert tok.num_special_tokens == 2


def test_truncation_keeps_the_special_tokens():
  tok = Tokenizer(bert_like())
  assert tok.encode_batch(["the cat sat on mat", "cat"], max_length=4) == [
    [2, 4, 5, 3],
    [2, 5, 3],
  ]
  assert tok.encode("the cat sat", add_special_tokens=False, max_length=2) == [
    4,
    5,
  ]
  # Truncation is per call: the next call sees the whole text.
  assert tok.encode("the cat sat on mat") == [2, 4, 5, 6, 7, 8, 3]
  with pytest.raises(ValueError, match="no room"):
    tok.encode("the cat", max_length=2)


def test_padding_and_truncation_saved_in_tokenizer_json_are_ignored(tmp_path):
  raw = bert_like()
  raw.enable_padding(length=16, pad_id=0, pad_token="[PAD]")
  raw.enable_truncation(3)
  path = tmp_path / "tokenizer.json"
  raw.save(str(path))
  assert Tokenizer.from_file(path).encode("the cat sat on") == [
    2,
    4,
    5,
    6,
    7,
    3,
  ]


def test_decode_skips_special_tokens_and_accepts_numpy():
  tok = Tokenizer(bert_like())
  ids = np.asarray([2, 4, 5, 3, 0, 0], np.int32)
  assert tok.decode(ids) == "the cat"
  assert tok.decode(ids, skip_special_tokens=False) == (
    "[CLS] the cat [SEP] [PAD] [PAD]"
  )
  assert tok.decode_batch([[4], [5, 6]]) == ["the", "cat sat"]


def test_folder_configs_take_precedence_over_the_vocabulary(tmp_path):
  folder = _save_folder(
    tmp_path / "ckpt",
    bert_like(),
    tokenizer_config={
      "pad_token": {"__type": "AddedToken", "content": "[PAD]"},
      "cls_token": "[SEP]",  # deliberately odd, to see it win
      "eos_token": None,
    },
    special_tokens_map={"sep_token": "[CLS]", "cls_token": "[CLS]"},
    config={"eos_token_id": [1, 3], "bos_token_id": 2},
  )
  tok = Tokenizer.from_folder(folder)
  assert tok.special == SpecialTokens(pad=0, bos=2, eos=1, cls=3, sep=2, unk=1)


def test_decoder_without_pad_token_pads_with_eos_or_zero(tmp_path):
  folder = _save_folder(
    tmp_path / "llama",
    llama_like(),
    tokenizer_config={
      "bos_token": "<s>",
      "eos_token": "</s>",
      "pad_token": None,
    },
  )
  tok = Tokenizer.from_folder(folder)
  assert tok.special == SpecialTokens(pad=None, bos=1, eos=2, unk=0)
  assert tok.pad_id == 2
  assert Tokenizer.from_folder(folder, pad_fallback="zero").pad_id == 0
  assert tok.encode("the cat") == [1, 3, 4]
  assert tok.special_prefix == (1,) and tok.special_suffix == ()
  with pytest.raises(ValueError, match="pad_fallback"):
    Tokenizer.from_folder(folder, pad_fallback="unk")


def test_config_token_missing_from_vocabulary_names_file_and_field(tmp_path):
  folder = _save_folder(
    tmp_path / "bad", llama_like(), tokenizer_config={"eos_token": "<|eot|>"}
  )
  with pytest.raises(ValueError) as error:
    Tokenizer.from_folder(folder)
  assert str(error.value) == (
    f"{folder / 'tokenizer_config.json'}: eos_token '<|eot|>' is not in the "
    "tokenizer's vocabulary"
  )


def test_config_id_outside_vocabulary_names_file_and_field(tmp_path):
  folder = _save_folder(
    tmp_path / "bad", llama_like(), config={"pad_token_id": 50}
  )
  with pytest.raises(ValueError, match="config.json: pad_token_id: id 50"):
    Tokenizer.from_folder(folder)


def test_missing_or_broken_tokenizer_file(tmp_path):
  with pytest.raises(FileNotFoundError, match="no such tokenizer file"):
    Tokenizer.from_folder(tmp_path)
  path = tmp_path / "tokenizer.json"
  path.write_text("{}")
  with pytest.raises(ValueError, match="not a valid tokenizer.json"):
    Tokenizer.from_file(path)
