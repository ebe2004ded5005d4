"""Batched generation for the decoders with a KV cache, jitted once per
shape and sampling setting.

Prompts are left-padded (attention mask 0 on the left); positions follow
the mask (transformers' `cumsum(mask) - 1`). The prompt fills the cache in
one step, then each step feeds one token per row. A row stops at its first
end-of-sequence token and gets `pad_token_id` afterwards; the loop ends
when every row has stopped or after `max_new_tokens`.

`head` picks the head that turns hidden states into logits: the model's
float head, or its Q8_0 copy read by the CPU kernel (`decode_head`; by
default only where that copy holds the same weights).
"""

import functools
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from qlora_jax.models.attention import KVCache
from qlora_jax.models.config import GPT2Config
from qlora_jax.models.decode_heads import decode_head


def select_tokens(
  logits: jnp.ndarray,
  rng: jax.Array | None,
  temperature: float = 0.0,
  top_k: int = 0,
  top_p: float = 1.0,
) -> jnp.ndarray:
  """int32 [B] next tokens from logits [B, vocab].

  temperature 0 is greedy (argmax). Otherwise logits are divided by the
  temperature, restricted to the `top_k` largest (0: all) and to the
  smallest set of most likely tokens whose probability reaches `top_p`,
  then sampled (transformers' order of warpers).
  """
  if temperature == 0.0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = logits.astype(jnp.float32) / temperature
  if top_k > 0:
    kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  if top_p < 1.0:
    ordered = jnp.sort(logits, axis=-1)[:, ::-1]
    probs = jax.nn.softmax(ordered, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs
    cutoff = jnp.min(
      jnp.where(before < top_p, ordered, jnp.inf), axis=-1, keepdims=True
    )
    logits = jnp.where(logits < cutoff, -jnp.inf, logits)
  return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


def generate(
  model: nn.Module,
  variables,
  prompt_ids,
  attention_mask=None,
  *,
  max_new_tokens: int,
  eos_token_id: int | Sequence[int] | None = None,
  pad_token_id: int | None = None,
  temperature: float = 0.0,
  top_k: int = 0,
  top_p: float = 1.0,
  rng: jax.Array | None = None,
  head: str = "auto",
) -> jnp.ndarray:
  """New tokens int32 [B, max_new_tokens] after left-padded prompts.

  Args:
    model: a LlamaForCausalLM or GPT2LMHeadModel.
    variables: its variables.
    prompt_ids: int32 [B, P], left-padded.
    attention_mask: [B, P], 1 for prompt tokens, 0 for left padding
      (default: all ones).
    max_new_tokens: tokens to generate per row (at most).
    eos_token_id: id(s) that end a row; default the config's.
    pad_token_id: fills a row after its end; default the config's, or 0.
    temperature, top_k, top_p: sampling (temperature 0: greedy).
    rng: PRNG key, needed when sampling.
    head: "auto", "float" or "q8_0": the head of every decoded token and of
      the prompt's last position (see `models.decode_head`).
  """
  c = model.config
  prompt_ids = jnp.asarray(prompt_ids, jnp.int32)
  if attention_mask is None:
    attention_mask = jnp.ones(prompt_ids.shape, jnp.int32)
  mask = np.asarray(attention_mask)
  if mask.shape != prompt_ids.shape:
    raise ValueError(
      f"attention_mask shape {mask.shape} differs from prompt_ids "
      f"{prompt_ids.shape}"
    )
  if not mask[:, -1].all():
    raise ValueError("prompts must be left-padded: a row ends with padding")
  if max_new_tokens < 1:
    raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
  total = prompt_ids.shape[1] + max_new_tokens
  if isinstance(c, GPT2Config) and total > c.max_positions:
    raise ValueError(
      f"{prompt_ids.shape[1]} prompt + {max_new_tokens} new tokens exceed "
      f"GPT-2's {c.max_positions} learned positions"
    )
  if temperature < 0 or not 0.0 < top_p <= 1.0 or top_k < 0:
    raise ValueError(
      f"bad sampling settings: temperature={temperature}, top_k={top_k}, "
      f"top_p={top_p}"
    )
  if temperature > 0 and rng is None:
    raise ValueError("sampling (temperature > 0) needs an rng key")
  if eos_token_id is None:
    eos_ids = tuple(c.eos_token_ids)
  elif isinstance(eos_token_id, int):
    eos_ids = (eos_token_id,)
  else:
    eos_ids = tuple(eos_token_id)
  if pad_token_id is None:
    pad_token_id = c.pad_token_id if c.pad_token_id is not None else 0
  if rng is None:
    rng = jax.random.key(0)
  return _generate(
    model,
    variables,
    prompt_ids,
    jnp.asarray(mask, jnp.int32),
    rng,
    decode_head(head, model, variables),
    max_new_tokens=int(max_new_tokens),
    eos_ids=eos_ids,
    pad_id=int(pad_token_id),
    temperature=float(temperature),
    top_k=int(top_k),
    top_p=float(top_p),
  )


@functools.partial(
  jax.jit,
  static_argnames=(
    "model",
    "max_new_tokens",
    "eos_ids",
    "pad_id",
    "temperature",
    "top_k",
    "top_p",
  ),
)
def _generate(
  model,
  variables,
  prompt_ids,
  mask,
  rng,
  q8_head=None,
  *,
  max_new_tokens,
  eos_ids,
  pad_id,
  temperature,
  top_k,
  top_p,
):
  c = model.config
  batch, length = prompt_ids.shape
  cache = KVCache.zeros(
    c.num_layers,
    batch,
    length + max_new_tokens,
    c.num_kv_heads,
    c.head_dim,
    model.opts.dtype,
  )
  positions = jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0)
  logits, cache = _last_logits(
    model, variables, prompt_ids, mask, positions, cache, q8_head
  )
  eos = jnp.asarray(eos_ids, jnp.int32)

  def emit(out, done, logits, rng, step):
    token = select_tokens(logits[:, -1], rng, temperature, top_k, top_p)
    token = jnp.where(done, pad_id, token)
    out = out.at[:, step].set(token)
    return out, done | jnp.isin(token, eos), token

  rng, sub = jax.random.split(rng)
  out = jnp.full((batch, max_new_tokens), pad_id, jnp.int32)
  out, done, token = emit(out, jnp.zeros(batch, bool), logits, sub, 0)

  def cond(state):
    step, _, done, *_ = state
    return (step < max_new_tokens) & ~jnp.all(done)

  def body(state):
    step, out, done, token, pos, cache, rng = state
    ones = jnp.ones((batch, 1), jnp.int32)
    logits, cache = model.apply(
      variables,
      token[:, None],
      ones,
      pos[:, None],
      cache=cache,
      decode_head=q8_head,
    )
    rng, sub = jax.random.split(rng)
    out, done, token = emit(out, done, logits, sub, step)
    return step + 1, out, done, token, pos + 1, cache, rng

  state = (jnp.int32(1), out, done, token, positions[:, -1] + 1, cache, rng)
  return jax.lax.while_loop(cond, body, state)[1]


@functools.partial(jax.jit, static_argnames=("model", "cache_length"))
def _prefill(model, variables, prompt_ids, cache_length, q8_head=None):
  c = model.config
  batch, length = prompt_ids.shape
  cache = KVCache.zeros(
    c.num_layers,
    batch,
    cache_length,
    c.num_kv_heads,
    c.head_dim,
    model.opts.dtype,
  )
  mask = jnp.ones((batch, length), jnp.int32)
  positions = jnp.broadcast_to(jnp.arange(length), (batch, length))
  logits, cache = _last_logits(
    model, variables, prompt_ids, mask, positions, cache, q8_head
  )
  return logits[:, -1], cache


def _last_logits(model, variables, ids, mask, positions, cache, q8_head):
  """The prompt's pass through the blocks, filling the cache, and the head
  at its last position only: logits [B, 1, vocab] (the whole prompt's
  would be B x L x vocab floats, 3.6 GB for four 872-token prompts of a
  262k vocabulary)."""
  hidden, cache = model.apply(
    variables, ids, mask, positions, cache=cache, return_hidden=True
  )
  last = hidden[:, -1:]
  return model.apply(variables, None, hidden=last, decode_head=q8_head), cache


@functools.partial(jax.jit, static_argnames=("model",))
def _decode_step(model, variables, token, position, cache, q8_head=None):
  ones = jnp.ones((token.shape[0], 1), jnp.int32)
  logits, cache = model.apply(
    variables,
    token[:, None],
    ones,
    position[:, None],
    cache=cache,
    decode_head=q8_head,
  )
  return logits[:, -1], cache


def stream(
  model: nn.Module,
  variables,
  prompt_ids: Sequence[int],
  *,
  max_new_tokens: int,
  eos_token_id: Sequence[int] = (),
  temperature: float = 0.0,
  top_k: int = 0,
  top_p: float = 1.0,
  rng: jax.Array | None = None,
  bucket: int = 256,
  head: str = "auto",
):
  """Yields one prompt's new tokens one at a time (an interactive chat).

  The KV cache holds the prompt and `max_new_tokens`, rounded up to a
  multiple of `bucket` so that prompts of similar length share one
  compiled prefill. Stops after an end token (which is not yielded).
  `head` as `generate`'s.
  """
  ids = jnp.asarray([list(prompt_ids)], jnp.int32)
  length = ids.shape[1]
  cache_length = -(-(length + max_new_tokens) // bucket) * bucket
  if (
    isinstance(model.config, GPT2Config)
    and cache_length > model.config.max_positions
  ):
    raise ValueError(
      f"{length} prompt + {max_new_tokens} new tokens exceed GPT-2's "
      f"{model.config.max_positions} learned positions"
    )
  rng = jax.random.key(0) if rng is None else rng
  q8_head = decode_head(head, model, variables)
  logits, cache = _prefill(model, variables, ids, cache_length, q8_head)
  position = jnp.asarray([length], jnp.int32)
  for _ in range(max_new_tokens):
    rng, sub = jax.random.split(rng)
    token = select_tokens(logits, sub, temperature, top_k, top_p)
    value = int(token[0])
    if value in eos_token_id:
      return
    yield value
    logits, cache = _decode_step(
      model, variables, token, position, cache, q8_head
    )
    position = position + 1
