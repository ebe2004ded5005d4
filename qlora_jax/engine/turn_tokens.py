"""Whether a base model has learned the turn tokens of its chat template.

A base model's vocabulary may hold its family's turn tokens without ever
having seen them in pretraining (Llama 3 8B base's `<|eot_id|>` and header
tokens have embedding rows of almost zero). Adapters on the linear layers
cannot give such a token a meaning: its row must train. A run that names a
template (`data.chat_template`) is warned, naming the tokens, when the
embedding row of one is under `UNTRAINED_FRACTION` of the median row's
norm; the cure is to train the embedding table (`train.train_modules`
with "embed_tokens"), as TRL's `setup_chat_format` gives new tokens rows
that train. Gemma 3's turn tokens are trained in its base model.
"""

import numpy as np
from absl import logging

from qlora_jax.data import chat_templates
from qlora_jax.data.tokenizer import Tokenizer

UNTRAINED_FRACTION = 0.01
SAMPLED_ROWS = 4096  # every k-th row, for the median norm
_EMBEDDING = ("base", "model", "embed_tokens", "embedding")


def embedding_table(variables):
  """The token embedding table of a decoder's variables (an array), or
  None where there is no array at the Llama-family path."""
  node = variables
  for key in _EMBEDDING:
    if not hasattr(node, "get") or key not in node:
      return None
    node = node[key]
  return node if hasattr(node, "shape") and len(node.shape) == 2 else None


def _norms(rows) -> np.ndarray:
  return np.linalg.norm(np.asarray(rows, np.float32), axis=-1)


def untrained(table, ids: dict[str, int]) -> dict[str, float]:
  """{token: its row's norm / the median row's norm} of the tokens in
  `ids` whose row is under `UNTRAINED_FRACTION` of the median norm (the
  median of every k-th row, `SAMPLED_ROWS` of them)."""
  step = max(1, table.shape[0] // SAMPLED_ROWS)
  median = float(np.median(_norms(table[::step])))
  ratios = {t: float(_norms(table[i])) / median for t, i in ids.items()}
  return {t: r for t, r in ratios.items() if r < UNTRAINED_FRACTION}


def warn_untrained(variables, tokenizer: Tokenizer, template: str) -> None:
  """Logs a warning naming the turn tokens of the built-in `template`
  (`data.chat_template`) whose embedding rows look untrained."""
  if template not in chat_templates.BUILT_IN:
    return
  table = embedding_table(variables)
  if table is None:
    return
  ids = {
    t: tokenizer.token_to_id(t)
    for t in chat_templates.BUILT_IN[template].tokens
  }
  rows = table.shape[0]
  found = untrained(table, {t: i for t, i in ids.items() if i < rows})
  if found:
    logging.warning(
      "data.chat_template %r: the embedding rows of %s are under %g of the "
      "median row's norm (%s), as in a base that never saw them: adapters "
      "cannot teach them; train the embedding table too "
      "(train.train_modules += ['embed_tokens'])",
      template,
      sorted(found),
      UNTRAINED_FRACTION,
      ", ".join(f"{t} {r:.2g}" for t, r in sorted(found.items())),
    )
