"""Activation functions by their Hugging Face names."""

import functools

import jax

ACTIVATIONS = {
  "gelu": functools.partial(jax.nn.gelu, approximate=False),
  "gelu_new": functools.partial(jax.nn.gelu, approximate=True),
  "gelu_pytorch_tanh": functools.partial(jax.nn.gelu, approximate=True),
  "relu": jax.nn.relu,
  "silu": jax.nn.silu,
  "swish": jax.nn.silu,
}


def activation(name: str):
  """The activation called `name` in a config.json (`hidden_act`)."""
  if name not in ACTIVATIONS:
    raise ValueError(
      f"unsupported activation {name!r}: expected one of {sorted(ACTIVATIONS)}"
    )
  return ACTIVATIONS[name]
