"""A JAX causal LM as lm-eval sees it, without importing lm_eval.

`TextModel` answers the three request types of lm-eval's `LM` with plain
arguments: `loglikelihood` takes (context, continuation) pairs,
`loglikelihood_rolling` texts, `generate_until` (context, generation
kwargs) pairs. `backend.JaxLM` hands lm-eval's instances to it, and the
tasks run without lm-eval (`native`) call it directly, so both score a
request the same way.

Semantics are those of lm-eval 0.4.13's Hugging Face backend (`HFLM`):
texts are encoded with the tokenizer's own special tokens unless they
start with the prefix token's text (a rendered chat); the prefix token is
BOS, else EOS; `generate_until` stops at the end token and cuts the text
at the first stop string (the EOS token's text among them); a chat renders
with the checkpoint's template, a system message dropped if the template
refuses it, the last message continued when no generation prompt is asked
for.
"""

from collections.abc import Sequence
from typing import Any

import jax

from qlora_jax.data import Tokenizer
from qlora_jax.data.chat import TemplateError
from qlora_jax.harness import requests, scoring


class TextModel:
  """A `scoring.Model` with its tokenizer, scoring texts."""

  def __init__(
    self,
    model: scoring.Model,
    tokenizer: Tokenizer,
    name: str,
    batch_size: int = 8,
    max_gen_toks: int = 256,
    seed: int = 0,
    end_ids: tuple[int, ...] = (),
  ):
    if batch_size < 1:
      raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if tokenizer is None:
      raise ValueError(f"{name}: no tokenizer, so texts cannot be encoded")
    self.model = model
    self.tokenizer = tokenizer
    self.name = name
    self.batch_size = batch_size
    self.max_gen_toks = max_gen_toks
    self.rng = jax.random.key(seed)
    self.end_ids = end_ids  # the model's EOS ids (without a tokenizer's end)
    prefix = tokenizer.bos_id if tokenizer.bos_id is not None else None
    self.prefix_id = prefix if prefix is not None else tokenizer.eos_id
    if self.prefix_id is None:
      raise ValueError(f"{name}: the tokenizer has neither BOS nor EOS")
    self._prefix_text = tokenizer.decode([self.prefix_id], False)

  def encode(self, text: str) -> list[int]:
    """Ids with the tokenizer's specials, none for a text that starts with
    the prefix token's text (a rendered chat)."""
    specials = not text.startswith(self._prefix_text)
    return self.tokenizer.encode(text, add_special_tokens=specials)

  def loglikelihood(
    self, pairs: Sequence[tuple[str, str]]
  ) -> list[tuple[float, bool]]:
    """(sum of the continuation's log-probs, all its tokens greedy) of each
    (context, continuation)."""
    rows = []
    for context, continuation in pairs:
      if context:
        ctx, cont = requests.encode_pair(self.encode, context, continuation)
      else:
        bare = self.tokenizer.encode(continuation, add_special_tokens=False)
        ctx, cont = requests.empty_context(bare, self.prefix_id)
      rows.append(requests.scored_row(ctx, cont, self.model.max_length))
    return scoring.score(self.model, rows, self.batch_size)

  def loglikelihood_rolling(self, texts: Sequence[str]) -> list[float]:
    """Each text's log-likelihood over lm-eval's disjoint rolling windows."""
    rows, owner = [], []
    for k, text in enumerate(texts):
      for ctx, pred in requests.rolling_windows(
        self.encode(text), self.prefix_id, self.model.max_length
      ):
        rows.append(requests.scored_row(ctx, pred, self.model.max_length))
        owner.append(k)
    totals = [0.0] * len(texts)
    for k, (logp, _) in zip(
      owner, scoring.score(self.model, rows, self.batch_size), strict=True
    ):
      totals[k] += logp
    return totals

  def generate_until(
    self, pairs: Sequence[tuple[str, dict[str, Any]]]
  ) -> list[str]:
    """The text generated after each context, cut at its stop strings."""
    tok = self.tokenizer
    eos_text = None
    if tok.eos_id is not None:
      eos_text = tok.decode([tok.eos_id], False)
    end_ids = list(tok.stop_ids) or list(self.end_ids)
    groups: dict[requests.Generation, list[int]] = {}
    for k, (_, kwargs) in enumerate(pairs):
      settings = requests.generation(dict(kwargs), eos_text, self.max_gen_toks)
      groups.setdefault(settings, []).append(k)
    out = [""] * len(pairs)
    for settings, members in groups.items():
      prompts = [self.encode(pairs[k][0]) for k in members]
      self.rng, sub = jax.random.split(self.rng)
      new = scoring.generate(
        self.model, prompts, settings, end_ids, self.batch_size, sub
      )
      for k, ids in zip(members, new, strict=True):
        out[k] = requests.cut_at_stops(tok.decode(ids), settings.until)
    return out

  def apply_chat_template(
    self, chat_history: list[dict[str, str]], add_generation_prompt=True
  ) -> str:
    """The chat rendered with the checkpoint's template."""
    try:
      return self._render(chat_history, add_generation_prompt)
    except TemplateError:
      kept = [m for m in chat_history if m["role"] != "system"]
      return self._render(kept, add_generation_prompt)

  def _render(self, messages, add_generation_prompt: bool) -> str:
    text = self.tokenizer.apply_chat_template(messages, add_generation_prompt)
    if add_generation_prompt:
      return text
    last = messages[-1]["content"].strip()  # continued, not closed
    return text[: text.rindex(last) + len(last)]
