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


def gated(act, gate: jax.Array, up: jax.Array) -> jax.Array:
  """act(gate) * up (a gated MLP's hidden state), keeping only `gate` and
  `up` for the backward pass, which recomputes act(gate) from them.

  Differentiated as written, the product would keep act(gate) and the
  activation's own intermediates (for silu, sigmoid(gate)) as well: with
  a [tokens, intermediate] array each, most of a Llama block's kept
  activations. The values and gradients are those of `act(gate) * up`.
  """
  return _gated(act)(gate, up)


@functools.cache
def _gated(act):
  return jax.checkpoint(lambda g, u: act(g) * u, prevent_cse=False)


def activation(name: str):
  """The activation called `name` in a config.json (`hidden_act`)."""
  if name not in ACTIVATIONS:
    raise ValueError(
      f"unsupported activation {name!r}: expected one of {sorted(ACTIVATIONS)}"
    )
  return ACTIVATIONS[name]
