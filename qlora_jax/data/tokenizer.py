"""A checkpoint's `tokenizer.json`, through the `tokenizers` library.

Special token ids (pad, bos, eos, cls, sep, unk) are looked up, for each
token, in this order: the folder's `tokenizer_config.json` (`pad_token`, ...),
`special_tokens_map.json`, `config.json` (`pad_token_id`, ...), then well-known
names in the vocabulary (`[PAD]`, `<pad>`, `<s>`, `</s>`, `<|endoftext|>`,
`[CLS]`, `[SEP]`, ...). A token named in a config file but missing from the
vocabulary is an error naming the file.

Padding and truncation stored in `tokenizer.json` are switched off: the data
pipeline pads and truncates itself. Decoder-only checkpoints often have no pad
token; `pad_id` then falls back to the EOS id (`pad_fallback="eos"`) or to 0
(`"zero"`). Which one does not matter to a model that honours the attention
mask (`segment_ids`).
"""

import dataclasses
import functools
import json
import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import tokenizers

from qlora_jax.data import chat

TOKENIZER_FILE = "tokenizer.json"
PAD_FALLBACKS = ("eos", "zero")
_NAMES = ("pad", "bos", "eos", "cls", "sep", "unk")
_CONFIG_FILES = ("tokenizer_config.json", "special_tokens_map.json")
_WELL_KNOWN = {
  "pad": ("[PAD]", "<pad>", "<|pad|>"),
  "bos": ("<s>", "<|begin_of_text|>", "<bos>", "<|startoftext|>"),
  "eos": ("</s>", "<|end_of_text|>", "<|endoftext|>", "<eos>"),
  "cls": ("[CLS]", "<cls>"),
  "sep": ("[SEP]", "<sep>"),
  "unk": ("[UNK]", "<unk>", "<|unk|>"),
}
_PROBES = ("a", "the", "hello", "0", ".")


@dataclasses.dataclass(frozen=True)
class SpecialTokens:
  """Ids of the special tokens a tokenizer has (None where it has none)."""

  pad: int | None = None
  bos: int | None = None
  eos: int | None = None
  cls: int | None = None
  sep: int | None = None
  unk: int | None = None


class Tokenizer:
  """Encodes text to ids and back; knows the special tokens' ids."""

  def __init__(
    self,
    tokenizer: tokenizers.Tokenizer,
    special: SpecialTokens | None = None,
    pad_fallback: str = "eos",
    chat_template: str | None = None,
    template_source: str = "chat template",
  ):
    if pad_fallback not in PAD_FALLBACKS:
      raise ValueError(
        f"pad_fallback must be one of {PAD_FALLBACKS}, got {pad_fallback!r}"
      )
    self._tok = tokenizers.Tokenizer.from_str(tokenizer.to_str())  # own copy
    self._tok.no_padding()
    self._tok.no_truncation()
    self.special = special or SpecialTokens(**_guess_from_vocab(self._tok))
    self.pad_fallback = pad_fallback
    self.chat_template = chat_template
    self.template_source = template_source  # where errors say it is from
    self._affixes: tuple[tuple[int, ...], tuple[int, ...]] | None = None

  def with_chat_template(
    self, chat_template: str | None, template_source: str
  ) -> "Tokenizer":
    """This tokenizer rendering chats with `chat_template` (None: none)."""
    return Tokenizer(
      self._tok, self.special, self.pad_fallback, chat_template, template_source
    )

  @classmethod
  def from_file(
    cls, path: str | os.PathLike, pad_fallback: str = "eos"
  ) -> "Tokenizer":
    """A bare `tokenizer.json`; special tokens are guessed from the vocab."""
    return cls(_load_json_tokenizer(path), pad_fallback=pad_fallback)

  @classmethod
  def from_folder(
    cls, folder: str | os.PathLike, pad_fallback: str = "eos"
  ) -> "Tokenizer":
    """A checkpoint folder holding `tokenizer.json` and maybe its configs."""
    tok = _load_json_tokenizer(os.path.join(folder, TOKENIZER_FILE))
    special = SpecialTokens(**_special_from_folder(folder, tok))
    config = os.path.join(folder, "tokenizer_config.json")
    template = _read_json(config).get("chat_template")
    if template is not None and not isinstance(template, str):
      raise ValueError(
        f"{config}: chat_template must be a string (named templates are "
        "not supported)"
      )
    return cls(tok, special, pad_fallback, template, f"{config} chat_template")

  @classmethod
  def load(
    cls, path: str | os.PathLike, pad_fallback: str = "eos"
  ) -> "Tokenizer":
    """`from_folder` for a directory, `from_file` otherwise."""
    if os.path.isdir(path):
      return cls.from_folder(path, pad_fallback)
    return cls.from_file(path, pad_fallback)

  @property
  def vocab_size(self) -> int:
    return self._tok.get_vocab_size(with_added_tokens=True)

  @property
  def pad_id(self) -> int:
    """The id padding uses: the pad token, else per `pad_fallback`."""
    if self.special.pad is not None:
      return self.special.pad
    if self.pad_fallback == "eos" and self.special.eos is not None:
      return self.special.eos
    return 0

  bos_id = property(lambda self: self.special.bos)
  eos_id = property(lambda self: self.special.eos)
  cls_id = property(lambda self: self.special.cls)
  sep_id = property(lambda self: self.special.sep)
  unk_id = property(lambda self: self.special.unk)

  @property
  def end_id(self) -> int | None:
    """The token that ends a document: EOS, else SEP, else None."""
    return (
      self.special.eos if self.special.eos is not None else self.special.sep
    )

  @functools.cached_property
  def end_of_turn_id(self) -> int | None:
    """The special token the chat template writes right after an
    assistant's text (`<|im_end|>`, `<end_of_turn>`, `<|eot_id|>`), or
    None (no template, or plain text there)."""
    if self.chat_template is None:
      return None
    try:
      after = chat.text_after_reply(
        self.chat_template, self.token_strings(), self.template_source
      )
    except chat.TemplateError:
      return None
    ids = self._tok.encode(after, add_special_tokens=False).ids
    added = self._tok.get_added_tokens_decoder()
    if ids and ids[0] in added and after.startswith(added[ids[0]].content):
      return ids[0]
    return None

  @property
  def stop_ids(self) -> tuple[int, ...]:
    """Ids that end a generated answer: the end token (EOS, else SEP) and
    the chat template's end of turn."""
    ids = [i for i in (self.end_id, self.end_of_turn_id) if i is not None]
    return tuple(dict.fromkeys(ids))

  @property
  def num_special_tokens(self) -> int:
    """How many ids the post-processor adds around a single text."""
    return self._tok.num_special_tokens_to_add(False)

  @property
  def special_prefix(self) -> tuple[int, ...]:
    """Ids the post-processor puts before a single sequence ([CLS], <s>)."""
    return self._special_affixes()[0]

  @property
  def special_suffix(self) -> tuple[int, ...]:
    """Ids the post-processor puts after a single sequence ([SEP])."""
    return self._special_affixes()[1]

  def token_to_id(self, token: str) -> int | None:
    return self._tok.token_to_id(token)

  def id_to_token(self, token_id: int) -> str | None:
    return self._tok.id_to_token(int(token_id))

  def encode(
    self,
    text: str,
    add_special_tokens: bool = True,
    max_length: int | None = None,
  ) -> list[int]:
    return self.encode_batch([text], add_special_tokens, max_length)[0]

  def encode_batch(
    self,
    texts: Sequence[str],
    add_special_tokens: bool = True,
    max_length: int | None = None,
  ) -> list[list[int]]:
    """Ids of each text; at most `max_length`, special tokens kept.

    Truncation drops tokens from the end of the text, never the special
    tokens the post-processor adds around it.
    """
    texts = list(texts)
    for i, text in enumerate(texts):
      if not isinstance(text, str):
        raise TypeError(
          f"texts[{i}] must be a string, got {type(text).__name__}"
        )
    if max_length is None:
      return [
        e.ids
        for e in self._tok.encode_batch(
          texts, add_special_tokens=add_special_tokens
        )
      ]
    specials = self.num_special_tokens if add_special_tokens else 0
    if max_length <= specials:
      raise ValueError(
        f"max_length {max_length} leaves no room for text next to the "
        f"{specials} special tokens the tokenizer adds"
      )
    self._tok.enable_truncation(max_length)
    try:
      encodings = self._tok.encode_batch(
        texts, add_special_tokens=add_special_tokens
      )
    finally:
      self._tok.no_truncation()
    return [e.ids for e in encodings]

  def encode_offsets(self, text: str) -> tuple[list[int], list[int]]:
    """(ids, start character of each token) of `text`, no special tokens
    added (those written in the text are recognised)."""
    e = self._tok.encode(text, add_special_tokens=False)
    return e.ids, [start for start, _ in e.offsets]

  def token_strings(self) -> dict[str, str]:
    """{"bos_token": ..., "eos_token": ..., ...}: the special tokens' text,
    as a chat template sees them."""
    out = {}
    for name in ("bos", "eos", "pad", "unk", "cls", "sep"):
      i = getattr(self.special, name)
      if i is not None:
        out[f"{name}_token"] = self._tok.id_to_token(i)
    return out

  def apply_chat_template(
    self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool
  ) -> str:
    """The conversation as the checkpoint's chat template renders it."""
    if self.chat_template is None:
      raise ValueError("the tokenizer has no chat template")
    return chat.render(
      self.chat_template,
      messages,
      add_generation_prompt,
      self.token_strings(),
      self.template_source,
    )

  def decode(
    self, ids: Iterable[int] | np.ndarray, skip_special_tokens: bool = True
  ) -> str:
    """Text of `ids` (pass only real tokens, e.g. `ids[segment_ids > 0]`)."""
    return self._tok.decode([int(i) for i in ids], skip_special_tokens)

  def decode_batch(
    self, rows: Iterable[Iterable[int]], skip_special_tokens: bool = True
  ) -> list[str]:
    return [self.decode(row, skip_special_tokens) for row in rows]

  def _special_affixes(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Finds the post-processor's ids around a probe text's own ids."""
    if self._affixes is not None:
      return self._affixes
    for probe in _PROBES:
      body = self._tok.encode(probe, add_special_tokens=False).ids
      full = self._tok.encode(probe, add_special_tokens=True).ids
      if not body:
        continue
      for start in range(len(full) - len(body) + 1):
        if full[start : start + len(body)] == body:
          self._affixes = (
            tuple(full[:start]),
            tuple(full[start + len(body) :]),
          )
          return self._affixes
    raise ValueError(
      "cannot tell which special tokens the tokenizer's post-processor adds "
      f"before and after a text (probed {_PROBES})"
    )


def _load_json_tokenizer(path: str | os.PathLike) -> tokenizers.Tokenizer:
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path}: no such tokenizer file")
  try:
    return tokenizers.Tokenizer.from_file(str(path))
  except Exception as e:  # the library raises plain Exception subclasses
    raise ValueError(f"{path}: not a valid tokenizer.json ({e})") from e


def _guess_from_vocab(tok: tokenizers.Tokenizer) -> dict[str, int | None]:
  found = {}
  for name in _NAMES:
    ids = [tok.token_to_id(t) for t in _WELL_KNOWN[name]]
    found[name] = next((i for i in ids if i is not None), None)
  return found


def _special_from_folder(
  folder: str | os.PathLike, tok: tokenizers.Tokenizer
) -> dict[str, int | None]:
  configs = {
    name: _read_json(os.path.join(folder, name))
    for name in (*_CONFIG_FILES, "config.json")
  }
  guessed = _guess_from_vocab(tok)
  vocab_size = tok.get_vocab_size(with_added_tokens=True)
  found = {}
  for name in _NAMES:
    found[name] = guessed[name]
    for file in _CONFIG_FILES:
      value = configs[file].get(f"{name}_token")
      if value is not None:
        where = f"{os.path.join(folder, file)}: {name}_token"
        found[name] = _token_id(tok, _token_content(value, where), where)
        break
    else:
      value = configs["config.json"].get(f"{name}_token_id")
      if value is not None:
        where = f"{os.path.join(folder, 'config.json')}: {name}_token_id"
        found[name] = _checked_id(value, vocab_size, where)
  return found


def _read_json(path: str) -> dict[str, Any]:
  if not os.path.isfile(path):
    return {}
  with open(path, encoding="utf-8") as f:
    try:
      value = json.load(f)
    except json.JSONDecodeError as e:
      raise ValueError(f"{path}: invalid JSON ({e})") from e
  if not isinstance(value, dict):
    raise ValueError(f"{path}: expected a JSON object")
  return value


def _token_content(value: Any, where: str) -> str:
  """A token is a string or an AddedToken object {"content": ...}."""
  if isinstance(value, dict):
    value = value.get("content")
  if not isinstance(value, str):
    raise ValueError(f"{where}: expected a token string, got {value!r}")
  return value


def _token_id(tok: tokenizers.Tokenizer, token: str, where: str) -> int:
  token_id = tok.token_to_id(token)
  if token_id is None:
    raise ValueError(f"{where} {token!r} is not in the tokenizer's vocabulary")
  return token_id


def _checked_id(value: Any, vocab_size: int, where: str) -> int:
  """An id from config.json; a list (several EOS ids) gives its first."""
  if isinstance(value, list) and value:
    value = value[0]
  if isinstance(value, bool) or not isinstance(value, int):
    raise ValueError(f"{where}: expected an integer id, got {value!r}")
  if not 0 <= value < vocab_size:
    raise ValueError(
      f"{where}: id {value} is outside the vocabulary [0, {vocab_size})"
    )
  return value
