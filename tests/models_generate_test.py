"""Generation with a KV cache: greedy tokens equal transformers' generate,
the cache equals recomputing the whole sequence, sampling follows its
distribution."""

import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qlora_jax import models
from qlora_jax.models import generation

HF = pathlib.Path(__file__).parent / "data" / "hf"
REF = np.load(HF / "llama_gqa" / "reference.npz")
NEW = 8  # tokens transformers generated after each 6-token prompt


@pytest.fixture(scope="module")
def llama():
  return models.from_pretrained(HF / "llama_gqa")


@pytest.mark.parametrize("scan_layers", [False, True])
def test_greedy_generation_matches_transformers(scan_layers):
  lm = models.from_pretrained(HF / "llama_gqa", scan_layers=scan_layers)
  out = models.generate(
    lm.model, lm.variables, REF["prompt_ids"], max_new_tokens=NEW
  )
  np.testing.assert_array_equal(out, REF["generated_ids"][:, 6:])
  padded = models.generate(
    lm.model,
    lm.variables,
    REF["padded_prompt_ids"],
    REF["padded_attention_mask"],
    max_new_tokens=NEW,
  )
  np.testing.assert_array_equal(padded, REF["padded_generated_ids"][:, 6:])


def test_gpt2_cached_generation_equals_recomputation():
  """Each greedy token is the argmax of a full forward pass without cache
  over the sequence before it (teacher forcing on the generated tokens)."""
  lm = models.from_pretrained(HF / "gpt2")
  prompt = REF["prompt_ids"]
  out = models.generate(
    lm.model, lm.variables, prompt, max_new_tokens=5, eos_token_id=()
  )
  seq = np.concatenate([prompt, np.asarray(out)], axis=1)
  logits = lm.model.apply(lm.variables, seq)
  recomputed = np.argmax(logits[:, prompt.shape[1] - 1 : -1], axis=-1)
  np.testing.assert_array_equal(out, recomputed)


def test_rows_stop_at_eos_and_are_padded_after(llama):
  # The first row's third greedy token serves as its end-of-sequence id.
  eos = int(REF["generated_ids"][0, 6 + 2])
  out = np.asarray(
    models.generate(
      llama.model,
      llama.variables,
      REF["prompt_ids"],
      max_new_tokens=NEW,
      eos_token_id=eos,
      pad_token_id=0,
    )
  )
  expected = REF["generated_ids"][:, 6:].copy()
  expected[0, 3:] = 0
  row1_stop = np.flatnonzero(expected[1] == eos)
  if len(row1_stop):
    expected[1, row1_stop[0] + 1 :] = 0
  np.testing.assert_array_equal(out, expected)


def test_one_compile_per_shape(llama):
  kw = dict(max_new_tokens=3, eos_token_id=())
  before = generation._generate._cache_size()
  for prompt in (REF["prompt_ids"], REF["prompt_ids"][::-1]):
    models.generate(llama.model, llama.variables, prompt, **kw)
  assert generation._generate._cache_size() == before + 1


def test_top_k_1_and_tiny_top_p_sample_the_argmax(llama):
  greedy = REF["generated_ids"][:, 6:]
  for settings in (dict(top_k=1), dict(top_p=1e-6)):
    out = models.generate(
      llama.model,
      llama.variables,
      REF["prompt_ids"],
      max_new_tokens=NEW,
      temperature=0.7,
      rng=jax.random.key(3),
      **settings,
    )
    np.testing.assert_array_equal(out, greedy)


def _frequencies(logits, n=20000, **settings):
  keys = jax.random.split(jax.random.key(0), n)
  draw = jax.vmap(
    lambda k: generation.select_tokens(logits[None], k, **settings)[0]
  )
  return np.bincount(np.asarray(draw(keys)), minlength=logits.shape[0]) / n


def test_sampling_follows_the_warped_distribution():
  """Empirical frequencies vs the formula (20k draws: 3 sigma ~ 0.01)."""
  logits = jnp.log(jnp.array([0.4, 0.3, 0.15, 0.1, 0.05]))
  # top_k = 3 keeps 0.4, 0.3, 0.15, renormalised.
  freq = _frequencies(logits, temperature=1.0, top_k=3)
  np.testing.assert_allclose(freq, [0.4706, 0.3529, 0.1765, 0, 0], atol=0.012)
  # top_p = 0.75: 0.4 + 0.3 < 0.75 so 0.15 is kept too (HF's rule).
  freq = _frequencies(logits, temperature=1.0, top_p=0.75)
  np.testing.assert_allclose(freq, [0.4706, 0.3529, 0.1765, 0, 0], atol=0.012)
  # temperature 0.5 squares the probabilities before normalising.
  p2 = np.array([0.4, 0.3, 0.15, 0.1, 0.05]) ** 2
  freq = _frequencies(logits, temperature=0.5)
  np.testing.assert_allclose(freq, p2 / p2.sum(), atol=0.012)


def test_bad_generation_requests_raise(llama):
  right_padded = np.array([[5, 6, 0]]), np.array([[1, 1, 0]])
  with pytest.raises(ValueError, match="left-padded"):
    models.generate(
      llama.model, llama.variables, *right_padded, max_new_tokens=2
    )
  with pytest.raises(ValueError, match="rng"):
    models.generate(
      llama.model,
      llama.variables,
      REF["prompt_ids"],
      max_new_tokens=2,
      temperature=1.0,
    )


def test_quantized_generation_dequantizes_one_layer_at_a_time():
  """Compiled greedy generation over a 4-bit model needs scratch memory
  for about one layer's dequantized weights, not the whole model's: XLA
  neither hoists the dequantizations out of the decoding loop nor starts
  them all before the prompt's forward pass. The float32 bytes of the
  dequantized weights are counted from the shapes; the bound (one
  layer's) fails by 8x when XLA schedules the dequantizations freely (it
  then holds every layer's twice: hoisted, and for the prompt)."""
  layers, hidden, inter, kv = 4, 256, 1024, 128
  cfg = {
    "model_type": "llama",
    "vocab_size": 128,
    "hidden_size": hidden,
    "intermediate_size": inter,
    "num_hidden_layers": layers,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 64,
    "rms_norm_eps": 1e-5,
  }
  quant = {"data_type": "nf4", "block_size": 64, "double_quant": True}
  lm = models.init_random(cfg, task="causal_lm", quant=quant)
  per_layer = 4 * (2 * hidden * hidden + 2 * hidden * kv + 3 * hidden * inter)
  ids = np.ones((1, 8), np.int32)
  compiled = generation._generate.lower(
    lm.model,
    lm.variables,
    ids,
    np.ones_like(ids),
    jax.random.key(0),
    max_new_tokens=4,
    eos_ids=(),
    pad_id=0,
    temperature=0.0,
    top_k=0,
    top_p=1.0,
  ).compile()
  temp = compiled.memory_analysis().temp_size_in_bytes
  assert temp < per_layer, (temp, per_layer, layers * per_layer)
