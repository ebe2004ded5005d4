"""The tokenizer a GGUF file describes, as a `tokenizers.Tokenizer`.

Byte-level BPE files (`tokenizer.ggml.model` "gpt2": GPT-2, Llama 3,
Qwen2, SmolLM) hold the vocabulary, the merges, each token's type and the
special token ids. The pre-tokenizer is named by `tokenizer.ggml.pre`: the
name of the split regex llama.cpp applies before byte-level BPE; each name
known here maps to the pre-tokenizer of the original `tokenizer.json`
(SmolLM's splits digits one by one, Llama 3's and Qwen2's cut with their
own regexes).

SentencePiece files ("llama": Gemma 3, Llama 2) hold pieces spelled with
"▁" for a space and a score for each, but no merges. They become a BPE
with byte fallback (`<0xNN>` pieces, token type 6) whose merges are
recovered from the vocabulary, as transformers does: every split of a
piece into two pieces is a merge, ranked by the piece's score, or for
Gemma by its position in the file (Gemma's scores do not follow its merge
order). Gemma files spell pieces of spaces alone with spaces; they are
respelled with "▁". The text is not split into words; a "▁" is prepended
to it where `tokenizer.ggml.add_space_prefix` says so, and a bos token
added unless `tokenizer.ggml.add_bos_token` is false.

In both kinds control tokens (type 3) are special added tokens and user
defined ones (type 4) plain added tokens, as in the original files.
"""

import dataclasses
import pathlib

import tokenizers
from tokenizers import AddedToken, Regex, decoders, pre_tokenizers, processors
from tokenizers.models import BPE

from qlora_jax.models.gguf_header import GGUFFile, read_gguf
from qlora_jax.models.safetensors_reader import CheckpointError

MODELS = ("gpt2", "llama")  # byte-level BPE, SentencePiece
CONTROL, USER_DEFINED = 3, 4
SPACE = "\u2581"  # SentencePiece's spelling of " "

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
# Architectures whose SentencePiece merges are ranked by file position.
_RANKED_BY_POSITION = ("gemma", "gemma2", "gemma3")
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


def _post_processor(
  f: GGUFFile, special: dict[str, tuple[str, int]], add_bos: bool
):
  """bos / eos around each sequence where the file says to add them.

  `add_bos` is the default where the file has no `add_bos_token`; None
  when neither token is added.
  """
  first, last = [], []
  for end, where, default in (("bos", first, add_bos), ("eos", last, False)):
    if f.get(f"tokenizer.ggml.add_{end}_token", bool, default):
      if f"{end}_token" not in special:
        raise CheckpointError(
          f"{f.path}: metadata key 'tokenizer.ggml.add_{end}_token' is set "
          f"but 'tokenizer.ggml.{end}_token_id' is missing"
        )
      where.append(special[f"{end}_token"])
  if not first and not last:
    return None

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


def _per_token(f: GGUFFile, key: str, tokens: list, default=...) -> list:
  """The list `key` of one value per token; raises if its length differs."""
  values = f.get(key, list, default)
  if len(values) != len(tokens):
    raise CheckpointError(
      f"{f.path}: metadata key {key!r} has {len(values)} entries for the "
      f"{len(tokens)} tokens of 'tokenizer.ggml.tokens'"
    )
  return values


def _byte_level_bpe(f: GGUFFile, tokens: list[str]):
  """(tokenizer, each token as the model spells it) of a "gpt2" file."""
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
  _check_merges(f, merges, vocab)
  bpe = BPE(vocab, merges, continuing_subword_prefix="", end_of_word_suffix="")
  tok = tokenizers.Tokenizer(bpe)
  prefix = f.get("tokenizer.ggml.add_space_prefix", bool, False)
  tok.pre_tokenizer = _pre_tokenizer(f, prefix)
  tok.decoder = decoders.ByteLevel()
  return tok, spelled


def _check_merges(
  f: GGUFFile, merges: list[tuple[str, str]], vocab: dict[str, int]
) -> None:
  """Each merge's two tokens and their join must be in `vocab` (tokenizers
  raises, or panics, on the first that is not)."""
  for i, (left, right) in enumerate(merges):
    for token in (left, right, left + right):
      if token not in vocab:
        raise CheckpointError(
          f"{f.path}: metadata key 'tokenizer.ggml.merges' entry {i} "
          f"({left} {right}) needs the token {token!r}, which is not among "
          f"the {len(vocab)} tokens of 'tokenizer.ggml.tokens' (out of "
          "vocabulary): the token list is cut short, or the merges belong "
          "to another vocabulary"
        )


def _recovered_merges(
  pieces: list[str], rank: list[float]
) -> list[tuple[str, str]]:
  """Every split of a piece into two pieces, as BPE merges, best first.

  Pieces go by `rank` (higher first), a piece's splits by the length of
  their left then right part (longer first), ties in the file's order. A
  piece listed twice has the rank and id of its last entry.
  """
  ids = {p: i for i, p in enumerate(pieces)}
  found = []
  for piece, i in ids.items():
    for cut in range(1, len(piece)):
      left, right = piece[:cut], piece[cut:]
      if left in ids and right in ids:
        found.append(((-rank[i], -cut, cut - len(piece)), (left, right)))
  found.sort(key=lambda x: x[0])  # stable
  return [pair for _, pair in found]


def _sentencepiece(f: GGUFFile, tokens: list[str], unk: tuple[str, int] | None):
  """(tokenizer, each token as the model spells it) of a "llama" file."""
  scores = _per_token(f, "tokenizer.ggml.scores", tokens)
  spelled = [SPACE * len(t) if t and not t.strip(" ") else t for t in tokens]
  by_position = f.get("general.architecture", str) in _RANKED_BY_POSITION
  rank = [-i for i in range(len(tokens))] if by_position else scores
  vocab = {t: i for i, t in enumerate(spelled)}
  merges = _recovered_merges(spelled, rank)
  tok = tokenizers.Tokenizer(
    BPE(
      vocab,
      merges,
      unk_token=None if unk is None else spelled[unk[1]],
      fuse_unk=True,
      byte_fallback=True,
    )
  )
  prefix = f.get("tokenizer.ggml.add_space_prefix", bool, True)
  tok.pre_tokenizer = pre_tokenizers.Metaspace(
    replacement=SPACE,
    prepend_scheme="first" if prefix else "never",
    split=False,
  )
  steps = [
    decoders.Replace(SPACE, " "),
    decoders.ByteFallback(),
    decoders.Fuse(),
  ]
  if prefix:
    steps.append(decoders.Strip(" ", left=1, right=0))
  tok.decoder = decoders.Sequence(steps)
  return tok, spelled


def gguf_tokenizer(source: "str | pathlib.Path | GGUFFile") -> GGUFTokenizer:
  """The byte-level BPE or SentencePiece tokenizer in a GGUF file's metadata.

  Raises:
    CheckpointError: a missing metadata key, a tokenizer model other than
      "gpt2" and "llama", an unknown pre-tokenizer, a per-token list
      (scores, types) whose length differs from the tokens', or a merge
      naming a token the list does not hold; the message names file and
      key.
  """
  f = source if isinstance(source, GGUFFile) else read_gguf(source)
  model = f.get("tokenizer.ggml.model", str)
  if model not in MODELS:
    raise CheckpointError(
      f"{f.path}: metadata key 'tokenizer.ggml.model' is {model!r}: "
      f"supported tokenizer models are {list(MODELS)}"
    )
  tokens = f.get("tokenizer.ggml.tokens", list)
  types = _per_token(f, "tokenizer.ggml.token_type", tokens, [1] * len(tokens))
  special = {}
  for name, key in _SPECIAL_IDS.items():
    token_id = f.get(f"tokenizer.ggml.{key}", int, None)
    if token_id is not None:
      _check_id(f, f"tokenizer.ggml.{key}", token_id, len(tokens))
      special[name] = (tokens[token_id], token_id)
  if model == "gpt2":
    tok, spelled = _byte_level_bpe(f, tokens)
    plain = processors.ByteLevel(trim_offsets=False)
  else:
    tok, spelled = _sentencepiece(f, tokens, special.get("unk_token"))
    plain = None
  # llama.cpp adds bos to SentencePiece text unless the file says not to.
  tok.post_processor = _post_processor(f, special, model == "llama") or plain
  special_ids = {i for _, i in special.values()}
  # A respelled token (a byte sequence, a run of spaces) is left to the
  # model, whatever its type says.
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
