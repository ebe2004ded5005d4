"""The tokenizer a GGUF file describes, as a `tokenizers.Tokenizer`.

Byte-level BPE files (`tokenizer.ggml.model` "gpt2": GPT-2, Llama 3,
Qwen2, SmolLM) hold the vocabulary, the merges, each token's type and the
special token ids. The pre-tokenizer is named by `tokenizer.ggml.pre`: the
name of the split regex llama.cpp applies before byte-level BPE; each name
known here maps to the pre-tokenizer of the original `tokenizer.json`
(SmolLM's splits digits one by one, Llama 3's and Qwen2's cut with their
own regexes). Control tokens (type 3) are special added tokens, user
defined ones (type 4) plain added tokens, as in the original files.
"""

import dataclasses
import pathlib

import tokenizers
from tokenizers import AddedToken, Regex, decoders, pre_tokenizers, processors
from tokenizers.models import BPE

from qlora_jax.models.gguf_reader import GGUFFile, read_gguf
from qlora_jax.models.safetensors_reader import CheckpointError

CONTROL, USER_DEFINED = 3, 4

_GPT2 = ("default", "gpt2", "gpt-2", "mpt", "olmo", "jais")
_DIGITS = ("smollm", "starcoder", "refact", "command-r", "codeshell")
_LLAMA3_SPLIT = (
  r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
  r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
  r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
  r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_SPLITS = {
  **dict.fromkeys(
    ("llama3", "llama-v3", "llama-bpe", "smaug-bpe"), _LLAMA3_SPLIT
  ),
  **dict.fromkeys(("qwen2", "deepseek-r1-qwen", "stablelm2"), _QWEN2_SPLIT),
}
PRE_TOKENIZERS = _GPT2 + _DIGITS + tuple(_SPLITS)
_SPECIAL_IDS = {
  "bos_token": "bos_token_id",
  "eos_token": "eos_token_id",
  "unk_token": "unknown_token_id",
  "pad_token": "padding_token_id",
}


@dataclasses.dataclass(frozen=True)
class GGUFTokenizer:
  """A GGUF file's tokenizer, chat template and special token strings.

  Attributes:
    tokenizer: encodes as the original `tokenizer.json` (with the bos /
      eos tokens added when `tokenizer.ggml.add_bos_token` /
      `add_eos_token` say so).
    chat_template: `tokenizer.chat_template` (a Jinja template), or None.
    special_tokens: {"bos_token": "<|im_start|>", ...} for those the file
      names (keys bos_token, eos_token, unk_token, pad_token).
    special_ids: their ids, under the same keys.
  """

  tokenizer: tokenizers.Tokenizer
  chat_template: str | None
  special_tokens: dict[str, str]
  special_ids: dict[str, int] = dataclasses.field(default_factory=dict)


def _byte_level_alphabet() -> set[str]:
  return set(pre_tokenizers.ByteLevel.alphabet())


def _bytes_to_unicode() -> dict[int, str]:
  """GPT-2's printable spelling of each byte."""
  keep = [*range(33, 127), *range(161, 173), *range(174, 256)]
  extra = [b for b in range(256) if b not in keep]
  spelling = {b: chr(b) for b in keep}
  spelling |= {b: chr(256 + i) for i, b in enumerate(extra)}
  return spelling


def _pre_tokenizer(f: GGUFFile, add_prefix_space: bool):
  name = f.get("tokenizer.ggml.pre", str, "default")
  byte_level = pre_tokenizers.ByteLevel(add_prefix_space=add_prefix_space)
  if name in _GPT2:
    return byte_level
  if name in _DIGITS:
    digits = pre_tokenizers.Digits(individual_digits=True)
    return pre_tokenizers.Sequence([digits, byte_level])
  if name in _SPLITS:
    split = pre_tokenizers.Split(Regex(_SPLITS[name]), behavior="isolated")
    bytes_only = pre_tokenizers.ByteLevel(
      add_prefix_space=add_prefix_space, use_regex=False
    )
    return pre_tokenizers.Sequence([split, bytes_only])
  raise CheckpointError(
    f"{f.path}: metadata key 'tokenizer.ggml.pre' is {name!r}: supported "
    f"pre-tokenizers are {sorted(PRE_TOKENIZERS)}"
  )


def _post_processor(f: GGUFFile, special: dict[str, tuple[str, int]]):
  """bos / eos around each sequence where the file says to add them."""
  first, last = [], []
  for end, where in (("bos", first), ("eos", last)):
    if f.get(f"tokenizer.ggml.add_{end}_token", bool, False):
      if f"{end}_token" not in special:
        raise CheckpointError(
          f"{f.path}: metadata key 'tokenizer.ggml.add_{end}_token' is set "
          f"but 'tokenizer.ggml.{end}_token_id' is missing"
        )
      where.append(special[f"{end}_token"])
  if not first and not last:
    return processors.ByteLevel(trim_offsets=False)

  def around(seq: str, type_id: int) -> list[str]:
    tagged = lambda ends: [f"{t}:{type_id}" for t, _ in ends]
    return [*tagged(first), f"${seq}:{type_id}", *tagged(last)]

  single = around("A", 0)
  pair = single + around("B", 1)
  return processors.TemplateProcessing(
    single=" ".join(single),
    pair=" ".join(pair),
    special_tokens=list(dict(first + last).items()),
  )


def _check_id(f: GGUFFile, key: str, token_id: int, vocab: int) -> None:
  if not 0 <= token_id < vocab:
    raise CheckpointError(
      f"{f.path}: metadata key {key!r} is {token_id}, outside the "
      f"vocabulary of {vocab} tokens"
    )


def gguf_tokenizer(source: "str | pathlib.Path | GGUFFile") -> GGUFTokenizer:
  """The byte-level BPE tokenizer stored in a GGUF file's metadata.

  Raises:
    CheckpointError: a missing metadata key, a tokenizer model other than
      "gpt2" or an unknown pre-tokenizer; the message names file and key.
  """
  f = source if isinstance(source, GGUFFile) else read_gguf(source)
  model = f.get("tokenizer.ggml.model", str)
  if model != "gpt2":
    raise CheckpointError(
      f"{f.path}: metadata key 'tokenizer.ggml.model' is {model!r}: only "
      "byte-level BPE ('gpt2') tokenizers are supported"
    )
  tokens = f.get("tokenizer.ggml.tokens", list)
  types = f.get("tokenizer.ggml.token_type", list, [1] * len(tokens))
  merges = []
  for i, merge in enumerate(f.get("tokenizer.ggml.merges", list)):
    pair = tuple(merge.split(" "))
    if len(pair) != 2:
      raise CheckpointError(
        f"{f.path}: metadata key 'tokenizer.ggml.merges' entry {i} is "
        f"{merge!r}, not two tokens separated by a space"
      )
    merges.append(pair)
  # llama.cpp writes tokens in GPT-2's byte spelling, except some that do
  # not decode; those are respelled to match the merges.
  alphabet, spelling = _byte_level_alphabet(), _bytes_to_unicode()
  spelled = [
    t if set(t) <= alphabet else "".join(spelling[b] for b in t.encode())
    for t in tokens
  ]
  vocab = {t: i for i, t in enumerate(spelled)}
  tok = tokenizers.Tokenizer(
    BPE(vocab, merges, continuing_subword_prefix="", end_of_word_suffix="")
  )
  prefix = f.get("tokenizer.ggml.add_space_prefix", bool, False)
  tok.pre_tokenizer = _pre_tokenizer(f, prefix)
  tok.decoder = decoders.ByteLevel()
  special = {}
  for name, key in _SPECIAL_IDS.items():
    token_id = f.get(f"tokenizer.ggml.{key}", int, None)
    if token_id is not None:
      _check_id(f, f"tokenizer.ggml.{key}", token_id, len(tokens))
      special[name] = (tokens[token_id], token_id)
  tok.post_processor = _post_processor(f, special)
  special_ids = {i for _, i in special.values()}
  # A respelled token is a byte sequence, whatever its type says.
  added = [
    AddedToken(t, normalized=False, special=kind == CONTROL or i in special_ids)
    for i, (t, kind) in enumerate(zip(spelled, types, strict=True))
    if (kind in (CONTROL, USER_DEFINED) or i in special_ids) and t == tokens[i]
  ]
  tok.add_special_tokens([a for a in added if a.special])
  tok.add_tokens([a for a in added if not a.special])
  template = f.get("tokenizer.chat_template", str, None)
  strings = {name: t for name, (t, _) in special.items()}
  ids = {name: i for name, (_, i) in special.items()}
  return GGUFTokenizer(tok, template, strings, ids)
