"""The decoding head (`models.decode_head`): a Q8_0 copy of the head read
by the CPU kernel, used by generation where asked for ("q8_0") or where it
holds the same weights ("auto").

The tiny tied Llama and GPT-2 get an embedding made exactly Q8_0 (d * q of
its own quantization), so that both heads multiply by the same weights:
their greedy tokens are then identical, and their logits agree to float32
summation order (1e-5 relative to the largest). The kernel's arithmetic is
tested in nn_cpu_q8_0_test.py."""

import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qlora_jax import models, quant
from qlora_jax.models import decode_heads as dh
from qlora_jax.nn import cpu_matmul

HF = pathlib.Path(__file__).parent / "data" / "hf"
needs_kernel = pytest.mark.skipif(
  cpu_matmul.unavailable() is not None,
  reason=f"the C++ kernel does not build here: {cpu_matmul.unavailable()}",
)


def _q8_exact(lm):
  """lm's variables with the tied head's table replaced by d * q."""
  table, _ = dh.head_weight(lm.model, lm.variables)
  exact = quant.dequantize_q8_0(quant.quantize_q8_0(table), table.dtype)
  variables = jax.tree.map(lambda a: a, lm.variables)  # a new outer tree
  node = variables["base"]
  *path, last = lm.model.TIED_HEAD
  for key in path:
    node = node[key]
  node[last] = exact
  return variables


def _prompts():
  ids = np.array([[5, 9, 17, 33, 2, 61], [0, 0, 7, 7, 40, 11]], np.int32)
  mask = np.array([[1] * 6, [0, 0, 1, 1, 1, 1]], np.int32)
  return ids, mask


def _head_error(lm, variables, ids):
  """Largest |q8_0 logits - float logits| over the largest |float logit|."""
  q8 = models.decode_head("q8_0", lm.model, variables)
  hidden = lm.model.apply(variables, jnp.asarray(ids), return_hidden=True)
  want = lm.model.apply(variables, None, hidden=hidden)
  got = lm.model.apply(variables, None, hidden=hidden, decode_head=q8)
  return float(jnp.abs(got - want).max() / jnp.abs(want).max())


@needs_kernel
def test_the_q8_0_head_gives_the_float_heads_tokens():
  lm = models.from_pretrained(HF / "llama_tied")
  variables = _q8_exact(lm)
  ids, mask = _prompts()
  out = {
    head: np.asarray(
      models.generate(
        lm.model,
        variables,
        ids,
        mask,
        max_new_tokens=12,
        eos_token_id=(),
        head=head,
      )
    )
    for head in ("float", "q8_0", "auto")
  }
  np.testing.assert_array_equal(out["q8_0"], out["float"])
  np.testing.assert_array_equal(out["auto"], out["float"])
  assert _head_error(lm, variables, ids) < 1e-5


@needs_kernel
def test_gpt2s_tied_head():
  lm = models.from_pretrained(HF / "gpt2")
  variables = _q8_exact(lm)
  assert models.decode_head("auto", lm.model, variables) is not None
  assert _head_error(lm, variables, _prompts()[0]) < 1e-5


@needs_kernel
def test_auto_takes_q8_0_only_where_the_weights_stay_the_same():
  lm = models.from_pretrained(HF / "llama_tied")
  assert models.decode_head("auto", lm.model, lm.variables) is None
  # asked for, the random table is quantized (lossy) all the same
  forced = models.decode_head("q8_0", lm.model, lm.variables)
  assert forced.codes.shape == (96, 64) and forced.codes.dtype == jnp.int8
  variables = _q8_exact(lm)
  auto = models.decode_head("auto", lm.model, variables)
  assert auto is not None
  # made once per table: a second call returns the same copy
  assert models.decode_head("auto", lm.model, variables) is auto
  bf16 = models.from_pretrained(HF / "llama_tied", dtype=jnp.bfloat16)
  assert models.decode_head("auto", bf16.model, variables) is None


@needs_kernel
def test_stream_with_the_q8_0_head_equals_generate():
  lm = models.from_pretrained(HF / "llama_gqa")  # untied: a float lm_head
  ids = [5, 9, 17, 33]
  streamed = list(
    models.stream(lm.model, lm.variables, ids, max_new_tokens=6, head="q8_0")
  )
  batch = models.generate(
    lm.model,
    lm.variables,
    np.asarray([ids], np.int32),
    max_new_tokens=6,
    eos_token_id=(),
    head="q8_0",
  )
  assert streamed == np.asarray(batch)[0].tolist()


def test_without_the_kernel_auto_is_the_float_head(monkeypatch):
  monkeypatch.setattr(cpu_matmul, "unavailable", lambda: "no compiler here")
  lm = models.from_pretrained(HF / "llama_tied")
  variables = _q8_exact(lm)
  assert models.decode_head("auto", lm.model, variables) is None
  with pytest.raises(ValueError, match="no compiler here"):
    models.decode_head("q8_0", lm.model, variables)
  ids, mask = _prompts()
  out = models.generate(
    lm.model, variables, ids, mask, max_new_tokens=4, eos_token_id=()
  )
  want = models.generate(
    lm.model,
    variables,
    ids,
    mask,
    max_new_tokens=4,
    eos_token_id=(),
    head="float",
  )
  np.testing.assert_array_equal(out, want)


def test_heads_it_cannot_copy_are_named():
  lm = models.from_pretrained(
    HF / "llama_gqa",
    lora={"rank": 2, "targets": ["lm_head"]},
  )
  _, reason = dh.head_weight(lm.model, lm.variables)
  assert reason == "lm_head has trainable parameters (adapters)"
  with pytest.raises(ValueError, match="adapters"):
    models.decode_head("q8_0", lm.model, lm.variables)
  with pytest.raises(ValueError, match="expected one of"):
    models.decode_head("q4_0", lm.model, lm.variables)
