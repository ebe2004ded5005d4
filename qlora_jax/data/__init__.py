"""Data: readers, tokenizer, fixed-shape arrays, resumable batch iterators.

  read_examples(path, task)           JSONL / .txt -> examples, file:line errors
  LabelMap                            sorted training labels -> ids, JSON
  Tokenizer.load(path_or_folder)      a checkpoint's tokenizer.json
  encode_classification / encode_lm   examples -> dict of numpy arrays
  BatchIterator / EvalIterator        deterministic, resumable, multi-process
  write_stdlib_docstrings(folder)     the default classification task
  read_preference_jsonl / encode_preference   DPO pairs -> [N, 2, L] arrays
  prompts.read_prompt_jsonl / encode_prompts  GRPO prompts -> left-padded ids
  arithmetic.splits / write / reward  Table 10's single-digit sums (GRPO)

Depends on numpy, `tokenizers` and the standard library only.

Imports no other package of qlora_jax.
"""

from qlora_jax.data.arrays import (
  CLASSIFICATION_FIELDS,
  LM_FIELDS,
  Document,
  classification_arrays,
  packed_lm_arrays,
  padded_lm_arrays,
)
from qlora_jax.data.assistant import write_assistant
from qlora_jax.data.encoding import (
  ClassificationData,
  chat_document,
  classification_splits,
  encode_classification,
  encode_lm,
  lm_documents,
  prompt_and_answer,
)
from qlora_jax.data.iterators import (
  BatchIterator,
  EvalIterator,
  epoch_permutation,
)
from qlora_jax.data.labels import LabelMap
from qlora_jax.data.preference import (
  PreferenceExample,
  encode_preference,
  read_preference_jsonl,
)
from qlora_jax.data.readers import (
  EXAMPLE_KINDS,
  ChatExample,
  ClassificationExample,
  InstructionExample,
  TextExample,
  read_classification_jsonl,
  read_examples,
  read_instruction_jsonl,
  read_lm_jsonl,
  read_text_file,
)
from qlora_jax.data.stdlib_docstrings import (
  build_splits,
  write_stdlib_docstrings,
  write_stdlib_questions,
)
from qlora_jax.data.tokenizer import SpecialTokens, Tokenizer

__all__ = [
  "CLASSIFICATION_FIELDS",
  "LM_FIELDS",
  "EXAMPLE_KINDS",
  "BatchIterator",
  "ClassificationData",
  "ChatExample",
  "ClassificationExample",
  "Document",
  "EvalIterator",
  "InstructionExample",
  "LabelMap",
  "PreferenceExample",
  "SpecialTokens",
  "TextExample",
  "Tokenizer",
  "build_splits",
  "classification_arrays",
  "classification_splits",
  "encode_classification",
  "chat_document",
  "encode_lm",
  "encode_preference",
  "epoch_permutation",
  "lm_documents",
  "prompt_and_answer",
  "packed_lm_arrays",
  "padded_lm_arrays",
  "read_classification_jsonl",
  "read_examples",
  "read_instruction_jsonl",
  "read_lm_jsonl",
  "read_preference_jsonl",
  "read_text_file",
  "write_assistant",
  "write_stdlib_docstrings",
  "write_stdlib_questions",
]
