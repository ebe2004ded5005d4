"""Splitting model variables into the trainable tree and the frozen rest.

The trainable tree holds the "params" collection (adapters, new heads) and
any "base" leaves named by `train_patterns` (PEFT's `modules_to_save`, or
everything for full fine-tuning). optax is built over the trainable tree
only, so no optimizer state exists for anything else.
"""

import re
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from flax import traverse_util

from qlora_jax import quant
from qlora_jax.nn.dense import BASE, PARAMS

Tree = Mapping[str, Any]


def _is_leaf(x) -> bool:
  return isinstance(x, quant.QuantizedTensor)


def flatten(tree: Tree) -> dict[tuple[str, ...], Any]:
  """{path tuple: leaf}; a QuantizedTensor (not a dict) is one leaf."""
  return traverse_util.flatten_dict(_unfreeze(tree))


def _unfreeze(tree):
  if isinstance(tree, Mapping):
    return {k: _unfreeze(v) for k, v in tree.items()}
  return tree


def unflatten(flat: Mapping[tuple[str, ...], Any]) -> dict:
  return traverse_util.unflatten_dict(dict(flat))


def split_trainable(
  variables: Tree, train_patterns: Sequence[str] = ()
) -> tuple[dict, dict]:
  """(trainable, frozen) trees; merge_trees(trainable, frozen) restores.

  Args:
    variables: the model's variables ({"base": ..., "params": ...}).
    train_patterns: regexes searched in "base" paths ("a/b/weight") whose
      leaves train too.

  Raises:
    ValueError: a pattern that matches nothing or a quantized leaf.
  """
  patterns = [re.compile(p) for p in train_patterns]
  used = set()
  trainable, frozen = {}, {}
  for path, leaf in flatten(variables).items():
    collection, name = path[0], "/".join(path[1:])
    train = collection == PARAMS
    if collection == BASE:
      for p in patterns:
        if p.search(name):
          used.add(p.pattern)
          train = True
      if train and _is_leaf(leaf):
        raise ValueError(
          f"cannot train {name}: it is quantized; exclude it from quantization"
        )
    (trainable if train else frozen)[path] = leaf
  unused = [p.pattern for p in patterns if p.pattern not in used]
  if unused:
    raise ValueError(f"train patterns {unused} match no frozen variable")
  return unflatten(trainable), unflatten(frozen)


def merge_trees(*trees: Tree) -> dict:
  """Deep union of disjoint trees."""
  out: dict = {}
  for tree in trees:
    for path, leaf in flatten(tree).items():
      if path in out:
        raise ValueError(f"variable {'/'.join(path)} is in two trees")
      out[path] = leaf
  return unflatten(out)


def num_params(tree: Tree) -> int:
  """Number of parameters; a QuantizedTensor counts its original elements."""
  total = 0
  for leaf in flatten(tree).values():
    if _is_leaf(leaf):
      total += _quantized_size(leaf)
    else:
      total += int(np.prod(leaf.shape))
  return total


def _quantized_size(qt: quant.QuantizedTensor) -> int:
  # Stacked (scanned) tensors carry leading axes on their leaves.
  stack = qt.codes.shape[:-1]
  return int(np.prod(stack, dtype=np.int64)) * qt.size


def num_bytes(tree: Tree) -> int:
  """Bytes of all arrays in `tree` (packed codes and scales included)."""
  leaves = jax.tree_util.tree_leaves(tree)
  return int(sum(np.prod(a.shape) * np.dtype(a.dtype).itemsize for a in leaves))
