"""Examples -> arrays through a real (tiny) `tokenizers` tokenizer."""

import numpy as np
import pytest
import tokenizers
from tokenizers import models, pre_tokenizers, processors

from qlora_jax.data import encoding, readers
from qlora_jax.data.labels import LabelMap
from qlora_jax.data.tokenizer import Tokenizer

WORDS = ["the", "cat", "sat", "on", "mat"]


def _tokenizer(specials, template=None):
  """Word-level: specials get ids 0.., then the=k cat=k+1 ... mat=k+4."""
  vocab = {t: i for i, t in enumerate([*specials, *WORDS])}
  tok = tokenizers.Tokenizer(models.WordLevel(vocab, unk_token=specials[0]))
  tok.pre_tokenizer = pre_tokenizers.Whitespace()
  tok.add_special_tokens(list(specials))
  if template:
    tok.post_processor = processors.TemplateProcessing(
      single=template,
      special_tokens=[(t, vocab[t]) for t in specials if t in template],
    )
  return Tokenizer(tok)


def bert():
  """[UNK]=0 [PAD]=1 [CLS]=2 [SEP]=3 the=4 cat=5 sat=6 on=7 mat=8."""
  return _tokenizer(["[UNK]", "[PAD]", "[CLS]", "[SEP]"], "[CLS] $A [SEP]")


def llama():
  """<unk>=0 <s>=1 </s>=2 the=3 cat=4 sat=5 on=6 mat=7; pads with EOS."""
  return _tokenizer(["<unk>", "<s>", "</s>"], "<s> $A")


def _write(path, lines):
  path.write_text("\n".join(lines) + "\n")
  return path


def test_classification_splits_read_tokenize_and_map_labels(tmp_path):
  train = _write(
    tmp_path / "train.jsonl",
    [
      '{"text": "the cat sat on the mat", "label": "b"}',
      '{"text": "mat", "label": "a"}',
    ],
  )
  evaluation = _write(
    tmp_path / "eval.jsonl", ['{"text": "cat", "label": "b"}']
  )
  data = encoding.classification_splits(train, evaluation, bert(), 5)
  assert data.label_map == LabelMap(("a", "b"))
  np.testing.assert_array_equal(
    data.train["input_ids"], [[2, 4, 5, 6, 3], [2, 8, 3, 1, 1]]
  )
  np.testing.assert_array_equal(
    data.train["segment_ids"], [[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]
  )
  np.testing.assert_array_equal(data.train["labels"], [1, 0])
  np.testing.assert_array_equal(data.eval["input_ids"], [[2, 5, 3, 1, 1]])
  np.testing.assert_array_equal(data.eval["labels"], [1])
  assert data.eval_examples[0].where == f"{evaluation}:1"


def test_unknown_eval_label_names_the_eval_file_and_line(tmp_path):
  train = _write(tmp_path / "train.jsonl", ['{"text": "cat", "label": "a"}'])
  evaluation = _write(
    tmp_path / "eval.jsonl",
    ['{"text": "cat", "label": "a"}', '{"text": "mat", "label": "z"}'],
  )
  with pytest.raises(ValueError, match=r"eval\.jsonl:2: unknown label \"z\""):
    encoding.classification_splits(train, evaluation, bert(), 8)


def test_instruction_example_loss_covers_completion_and_eos(tmp_path):
  tok = llama()
  examples = [
    readers.InstructionExample("the cat", "sat on mat", "f:1"),
    readers.InstructionExample("", "mat", "f:2"),
  ]
  arrays = encoding.encode_lm(examples, tok, 8)
  # <s> the cat | sat on mat </s>;  <s> | mat </s>
  np.testing.assert_array_equal(
    arrays["input_ids"], [[1, 3, 4, 5, 6, 7, 2, 2], [1, 7, 2, 2, 2, 2, 2, 2]]
  )
  np.testing.assert_array_equal(
    arrays["loss_mask"], [[0, 0, 1, 1, 1, 1, 0, 0], [1, 1, 0, 0, 0, 0, 0, 0]]
  )
  trained = arrays["targets"][0][arrays["loss_mask"][0] > 0]
  assert tok.decode(trained, skip_special_tokens=False) == "sat on mat </s>"


def test_language_modelling_ends_documents_once(tmp_path):
  # Llama-like: <s> text </s>.  BERT-like: [CLS] text [SEP], no extra end.
  lm = [
    readers.TextExample("the cat", "f:1"),
    readers.TextExample("mat", "f:2"),
  ]
  packed = encoding.encode_lm(lm, llama(), 4, packing=True)
  np.testing.assert_array_equal(
    packed["input_ids"], [[1, 3, 4, 2], [1, 7, 2, 2]]
  )
  np.testing.assert_array_equal(
    packed["segment_ids"], [[1, 1, 1, 1], [1, 1, 1, 0]]
  )
  padded = encoding.encode_lm(lm, bert(), 5)
  np.testing.assert_array_equal(
    padded["input_ids"], [[2, 4, 5, 3, 1], [2, 8, 3, 1, 1]]
  )


def test_packing_needs_an_end_token():
  no_end = _tokenizer(["<unk>", "<s>"], "<s> $A")  # the=2 cat=3, pads with 0
  examples = [readers.TextExample("the cat", "f:1")]
  assert encoding.encode_lm(examples, no_end, 4)["input_ids"].tolist() == [
    [1, 2, 3, 0]
  ]
  with pytest.raises(ValueError, match="neither an EOS nor a SEP"):
    encoding.encode_lm(examples, no_end, 4, packing=True)


def test_prompts_that_leave_no_loss_token_are_an_error():
  examples = [readers.InstructionExample("the cat sat on", "mat", "f:1")]
  with pytest.raises(ValueError, match="no row has a loss token"):
    encoding.encode_lm(examples, llama(), 4)
  with pytest.raises(TypeError, match="f:3: language modelling takes"):
    encoding.encode_lm(
      [readers.ClassificationExample("cat", "a", "f:3")], llama(), 4
    )


def test_rows_without_a_loss_token_warn_in_training_and_leave_eval(caplog):
  """Reference: the rows by hand. At max_length 4 "the cat sat on" fills
  every position (<s> the cat sat), so its row has no loss token; "the"
  leaves "mat </s>" to learn."""
  examples = [
    readers.InstructionExample("the cat sat on", "mat", "f:1"),
    readers.InstructionExample("the", "mat", "f:2"),
  ]
  with caplog.at_level("INFO"):
    kept = encoding.encode_lm(examples, llama(), 4)
  assert len(kept["input_ids"]) == 2
  assert [r.levelname for r in caplog.records] == ["WARNING"]
  assert (
    "1 of 2 rows have no loss token" in caplog.text and "f:1" in caplog.text
  )
  caplog.clear()
  with caplog.at_level("INFO"):
    dropped = encoding.encode_lm(examples, llama(), 4, drop_empty=True)
  assert [r.levelname for r in caplog.records] == ["INFO"]
  assert "left out of the loss" in caplog.text
  # Only the second row stays: <s> the mat </s>, loss on mat and </s>.
  np.testing.assert_array_equal(dropped["input_ids"], [[1, 3, 7, 2]])
  np.testing.assert_array_equal(dropped["loss_mask"], [[0, 1, 1, 0]])
  for name, column in dropped.items():
    np.testing.assert_array_equal(column, kept[name][1:], err_msg=name)
