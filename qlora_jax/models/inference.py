"""Outputs of a checkpoint for a batch of token ids (parity checks)."""

import functools
import pathlib

import jax
import jax.numpy as jnp
import numpy as np

from qlora_jax import nn as qnn
from qlora_jax.models.config import BertConfig, read_config
from qlora_jax.models.pretrained import from_pretrained


def checkpoint_outputs(
  checkpoint: str | pathlib.Path,
  input_ids: np.ndarray,
  *,
  quant: str = qnn.FLOAT,
  block_size: int = 64,
  double_quant: bool = False,
  dtype=jnp.float32,
) -> np.ndarray:
  """float32 outputs of the checkpoint folder for int input_ids [B, L].

  Decoders give logits [B, L, vocab] (every id is a token); BERT gives the
  last hidden state [B, L, hidden], with id 0 taken as padding. `quant`
  names a data type ("nf4", "int4", ...) to quantize every linear layer
  but output heads, or "none" (`nn.FLOAT`).
  """
  ids = np.asarray(input_ids)
  if ids.ndim != 2 or not np.issubdtype(ids.dtype, np.integer):
    raise ValueError(
      f"input_ids must be integers of shape [batch, seq], got {ids.dtype} "
      f"{ids.shape}"
    )
  config = read_config(pathlib.Path(checkpoint) / "config.json")
  if ids.size and (ids.min() < 0 or ids.max() >= config.vocab_size):
    raise ValueError(
      f"input_ids must lie in [0, {config.vocab_size}): got "
      f"[{ids.min()}, {ids.max()}]"
    )
  quant_cfg = qnn.QuantTargets.parse(
    {"data_type": quant, "block_size": block_size, "double_quant": double_quant}
  )
  is_bert = isinstance(config, BertConfig)
  task = "embedding" if is_bert else "causal_lm"
  lm = from_pretrained(checkpoint, task=task, quant=quant_cfg, dtype=dtype)
  ids = jnp.asarray(ids, jnp.int32)
  if is_bert:
    segments = (ids != config.pad_token_id).astype(jnp.int32)
    apply = functools.partial(lm.model.apply, method="hidden_states")
    out = jax.jit(apply)(lm.variables, ids, segments)
  else:
    out = jax.jit(lm.model.apply)(lm.variables, ids)
  return np.asarray(out, np.float32)
