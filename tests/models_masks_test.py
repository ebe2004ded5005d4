"""Masks, packing, padding, positions and rotary scaling."""

import dataclasses
import pathlib

import jax.numpy as jnp
import numpy as np
import pytest

from qlora_jax import models
from qlora_jax.models import attention, rope

HF = pathlib.Path(__file__).parent / "data" / "hf"


def test_segment_mask_truth_table():
  seg = jnp.array([[1, 1, 2, 0]])
  got = np.asarray(attention.segment_mask(seg, seg)[0]).astype(int)
  # Rows are queries: tokens see their own segment; padding (0) is never
  # visible; a padding query sees every non-padding key.
  want = [[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0], [1, 1, 1, 0]]
  np.testing.assert_array_equal(got, want)


def test_causal_mask_with_sliding_window():
  idx = jnp.arange(4)
  got = np.asarray(attention.causal_mask(idx, idx, window=2)).astype(int)
  want = [[1, 0, 0, 0], [1, 1, 0, 0], [0, 1, 1, 0], [0, 0, 1, 1]]
  np.testing.assert_array_equal(got, want)


# Row 0 packs documents A (4 tokens) and B (3 tokens) with positions
# restarting, then one padding token; rows 1 and 2 hold A and B alone,
# right-padded to the same length.
A, B = [5, 9, 14, 20], [7, 3, 11]
IDS = np.array([A + B + [0], A + [0] * 4, B + [0] * 5])
SEGMENTS = np.array(
  [[1] * 4 + [2] * 3 + [0], [1] * 4 + [0] * 4, [1] * 3 + [0] * 5]
)
POSITIONS = np.array([[0, 1, 2, 3, 0, 1, 2, 0], list(range(8)), list(range(8))])


def _check_packing(out):
  np.testing.assert_allclose(out[0, :4], out[1, :4], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(out[0, 4:7], out[2, :3], rtol=1e-5, atol=1e-5)


def test_packed_decoder_row_equals_separate_rows():
  lm = models.from_pretrained(HF / "llama_gqa")
  _check_packing(lm.model.apply(lm.variables, IDS, SEGMENTS, POSITIONS))


def test_bert_packed_and_padded_rows_equal_separate_sentences():
  enc = models.from_pretrained(HF / "bert", task="embedding")
  args = (enc.variables, IDS, SEGMENTS, POSITIONS)
  hidden = enc.model.apply(*args, method="hidden_states")
  _check_packing(hidden)
  alone = enc.model.apply(enc.variables, np.array([A]), method="hidden_states")
  np.testing.assert_allclose(hidden[1, :4], alone[0], rtol=1e-5, atol=1e-5)
  # Sentence embeddings: masked mean over the row's tokens, unit norm.
  emb = enc.model.apply(*args)
  mean = np.asarray(alone[0]).mean(0)
  np.testing.assert_allclose(emb[1], mean / np.linalg.norm(mean), atol=1e-5)


def test_mistral_sliding_window_limits_attention():
  """Mistral's window: with window 2, the logits at position p depend on
  tokens p-1 and p only; without it, on every earlier token."""
  raw = dict(
    model_type="mistral",
    vocab_size=32,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=1,
    num_attention_heads=4,
    num_key_value_heads=2,
    sliding_window=2,
  )
  lm = models.init_random(raw)
  assert lm.config.sliding_window == 2
  full = dataclasses.replace(lm.config, sliding_window=None)
  ids = np.array([[3, 4, 5, 6], [9, 4, 5, 6]])  # differ at position 0 only
  windowed = lm.model.apply(lm.variables, ids)
  unlimited = models.LlamaForCausalLM(full).apply(lm.variables, ids)
  np.testing.assert_array_equal(windowed[0, 2:], windowed[1, 2:])
  assert np.abs(unlimited[0, 2:] - unlimited[1, 2:]).max() > 1e-3


def test_linear_rope_scaling_divides_positions():
  """'linear' scaling by f at position p is the default rope at p / f."""
  default = models.RopeConfig(theta=10000.0)
  linear = models.RopeConfig(theta=10000.0, type="linear", factor=4.0)
  pos = jnp.arange(0, 64, 4)[None]
  cos_l, sin_l = rope.rotary_table(pos, rope.inverse_frequencies(linear, 16))
  cos_d, sin_d = rope.rotary_table(
    pos / 4, rope.inverse_frequencies(default, 16)
  )
  np.testing.assert_allclose(cos_l, cos_d, atol=1e-5)
  np.testing.assert_allclose(sin_l, sin_d, atol=1e-5)


def test_llama3_scaling_keeps_high_and_divides_low_frequencies():
  """Wavelengths below original/high_freq_factor are kept, those above
  original/low_freq_factor divided by the factor (Llama 3.1 rule)."""
  cfg = models.RopeConfig(500000.0, "llama3", 8.0, 1.0, 4.0, 8192)
  plain = rope.inverse_frequencies(models.RopeConfig(500000.0), 128)
  scaled = rope.inverse_frequencies(cfg, 128)
  wavelen = 2 * np.pi / plain
  high, low = wavelen < 8192 / 4, wavelen > 8192
  assert high.any() and low.any() and (~high & ~low).any()
  np.testing.assert_array_equal(scaled[high], plain[high])
  np.testing.assert_allclose(scaled[low], plain[low] / 8, rtol=1e-6)
  mid = ~high & ~low
  assert ((scaled[mid] < plain[mid]) & (scaled[mid] > plain[mid] / 8)).all()


@pytest.mark.parametrize(
  "change, message",
  [
    ({"num_key_value_heads": 3}, "num_key_value_heads"),
    ({"hidden_act": "mish"}, "hidden_act"),
    ({"rope_parameters": {"rope_type": "linear"}}, "needs a 'factor'"),
    ({"use_sliding_window": True}, "sliding-window"),
    ({"vocab_size": None}, "'vocab_size' is required"),
  ],
)
def test_config_errors_name_the_field(change, message):
  raw = dict(
    model_type="qwen2",
    vocab_size=96,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
  )
  raw.update(change)
  with pytest.raises(models.ConfigError, match=message):
    models.from_dict(raw, "my/config.json")
