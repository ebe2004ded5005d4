"""Qwen3, Gemma 3 (text) and Phi-3 against transformers, from Hugging Face
folders and from GGUF files.

Reference: tests/data/hf/{qwen3,gemma3_text,phi3}/reference.npz, written by
transformers 5.24 (float32, eager attention) with
tests/fixtures/make_hf_fixtures.py. Tolerance: max|ours - ref| / max|ref|
<= 1e-4 (quantization off, float32 compute); greedy tokens identical.
"""

import dataclasses
import json
import pathlib
import shutil

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import safetensors.numpy

from qlora_jax import models
from qlora_jax import nn as qnn
from qlora_jax.engine import steps
from qlora_jax.models import gguf_layout
from qlora_jax.models.config import ConfigError
from qlora_jax.models.safetensors_reader import CheckpointError

HF = pathlib.Path(__file__).parent / "data" / "hf"
FAMILIES = ["qwen3", "gemma3_text", "phi3"]
TOL = 1e-4


def _rel_error(ours, ref) -> float:
  return float(np.abs(np.asarray(ours) - ref).max() / np.abs(ref).max())


@pytest.mark.parametrize("scan", [False, True], ids=["layers", "scanned"])
@pytest.mark.parametrize("name", FAMILIES)
def test_logits_match_transformers(name, scan):
  ref = np.load(HF / name / "reference.npz")
  lm = models.from_pretrained(HF / name, scan_layers=scan, remat=scan)
  err = _rel_error(
    lm.model.apply(lm.variables, ref["input_ids"]), ref["logits"]
  )
  print(f"{name} scan={scan}: max rel error {err:.2e}")
  assert err <= TOL


def test_phi3_longrope_short_and_long_factors():
  """Phi-3-128k's LongRoPE over a pretraining length of 6: 6 positions use
  the short factors, 10 the long ones (for every position, as transformers
  picks per forward); both scaled by the default attention factor
  sqrt(1 + ln(64 / 6) / ln 6)."""
  ref = np.load(HF / "phi3" / "reference_longrope.npz")
  config = models.read_config(HF / "phi3" / "config_longrope.json")
  assert config.rope.type == "longrope"
  assert config.rope.attention_factor == pytest.approx(
    np.sqrt(1 + np.log(64 / 6) / np.log(6)), rel=1e-12
  )
  lm = models.from_pretrained(HF / "phi3", config=config, with_tokenizer=False)
  ids = ref["input_ids"]
  long = lm.model.apply(lm.variables, ids)
  short = lm.model.apply(lm.variables, ids[:, :6])
  errs = _rel_error(long, ref["logits"]), _rel_error(short, ref["short_logits"])
  print(f"phi3 LongRoPE: max rel error long {errs[0]:.2e}, short {errs[1]:.2e}")
  assert max(errs) <= TOL


def test_gemma3_greedy_tokens_with_the_cache_past_the_window():
  """12 cached decoding steps of a model whose sliding layers see 4 keys:
  the tokens transformers' generate gives (its prompt and 12 new ones)."""
  ref = np.load(HF / "gemma3_text" / "reference.npz")
  prompt = jnp.asarray(ref["prompt_ids"])
  lm = models.from_pretrained(HF / "gemma3_text", scan_layers=True)
  new = models.generate(
    lm.model, lm.variables, prompt, max_new_tokens=12, eos_token_id=[]
  )
  want = ref["generated_ids"][:, prompt.shape[1] :]
  np.testing.assert_array_equal(np.asarray(new), want)


def test_gemma3_both_config_layouts_give_the_same_model():
  """layer_types + rope_parameters (transformers 5) and the older
  sliding_window_pattern + rope_theta / rope_local_base_freq."""
  new = models.read_config(HF / "gemma3_text" / "config.json")
  old = models.read_config(HF / "gemma3_text" / "config_pattern.json")
  assert new == old
  assert new.layer_kinds == (True, True, False)
  assert (new.rope.theta, new.local_rope.theta) == (1e6, 1e4)
  assert new.attn_scale == pytest.approx(24**-0.5)


def _train_losses(name, steps_run=6):
  """Losses of `steps_run` AdamW steps of NF4 + DQ QLoRA (r=4 on every
  linear layer, scanned and rematerialised) on one fixed batch."""
  lm = models.from_pretrained(
    HF / name,
    lora={"rank": 4, "alpha": 8.0},
    quant={"data_type": "nf4", "block_size": 32},
    scan_layers=True,
    remat=True,
  )
  trainable, frozen = qnn.split_trainable(lm.variables, [])
  tx = optax.adamw(1e-2)
  state = steps.create_state(trainable, tx, 0)
  batch = steps.random_lm_batch(
    np.random.default_rng(0), lm.config.vocab_size, 2, 16
  )
  step = jax.jit(
    lambda s, b, f: steps.train_step(
      s, b, f, model=lm.model, task="causal_lm", tx=tx
    )
  )
  losses = []
  for _ in range(steps_run):
    state, metrics = step(state, batch, frozen)
    losses.append(float(metrics["loss"]) / float(metrics["weight"]))
  return lm.plan, losses


@pytest.mark.parametrize("name", FAMILIES)
def test_qlora_trains_every_linear_layer(name):
  plan, losses = _train_losses(name)
  linear = {p.split("/")[-1] for p in plan.lora_paths()}
  want = (
    {"qkv_proj", "o_proj", "gate_up_proj", "down_proj"}
    if name == "phi3"
    else {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj"}
    | {"down_proj"}
  )
  assert linear == want
  assert plan.lora_paths() == plan.quant_paths()
  assert all(np.isfinite(losses)) and losses[-1] < 0.9 * losses[0], losses


ARCH = {"qwen3": "qwen3", "gemma3": "gemma3", "phi3": "phi3"}


def _write_gguf(folder: pathlib.Path, path: pathlib.Path, arch: str):
  """A float32 GGUF of the folder's tensors, named, laid out and (Gemma's
  norms: 1 + w) stored as llama.cpp's converter writes them."""
  cfg = json.loads((folder / "config.json").read_text())
  tensors = safetensors.numpy.load_file(folder / "model.safetensors")
  w = gguf.GGUFWriter(str(path), arch)
  w.add_block_count(cfg["num_hidden_layers"])
  w.add_context_length(cfg["max_position_embeddings"])
  w.add_embedding_length(cfg["hidden_size"])
  w.add_feed_forward_length(cfg["intermediate_size"])
  w.add_head_count(cfg["num_attention_heads"])
  w.add_head_count_kv(cfg["num_key_value_heads"])
  w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
  w.add_vocab_size(cfg["vocab_size"])
  head_dim = (
    cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
  )
  w.add_key_length(head_dim)
  w.add_value_length(head_dim)
  rope = cfg.get("rope_parameters") or {}
  theta = rope.get("full_attention", rope).get("rope_theta", 10000.0)
  w.add_rope_freq_base(theta)
  if arch == "gemma3":
    w.add_sliding_window(cfg["sliding_window"])
  scaling = cfg.get("rope_scaling") or {}
  if scaling.get("type") == "longrope":  # as the converter writes Phi-3-128k
    original = cfg["original_max_position_embeddings"]
    factor = cfg["max_position_embeddings"] / original
    w.add_rope_scaling_orig_ctx_len(original)
    w.add_rope_scaling_attn_factors(
      np.sqrt(1 + np.log(factor) / np.log(original))
    )
    for which in ("long", "short"):
      values = np.asarray(scaling[f"{which}_factor"], np.float32)
      w.add_tensor(f"rope_factors_{which}.weight", values)
  for key, value in tensors.items():
    value = value + np.float32(gguf_layout.norm_shift(arch, key))
    w.add_tensor(gguf_layout.gguf_name(key, arch), value.astype(np.float32))
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
  return path


@pytest.mark.parametrize("name", FAMILIES + ["phi3_longrope"])
def test_gguf_file_loads_to_the_folders_logits(name, tmp_path):
  """The folder's tensors written as llama.cpp names and stores them load
  to the same model. llama.cpp's gemma3 fixes its layer pattern at one
  full layer in six and scales scores by head_dim ** -0.5 (Gemma 3 up to
  12B), so the folder is compared with those. phi3_longrope: Phi-3 with
  LongRoPE, its factors stored as tensors and the attention factor (float32
  in the file) in the metadata."""
  folder = tmp_path / "hf"
  shutil.copytree(HF / name.removesuffix("_longrope"), folder)
  if name == "phi3_longrope":
    shutil.copy(folder / "config_longrope.json", folder / "config.json")
  if name == "gemma3_text":
    cfg = json.loads((folder / "config.json").read_text())
    cfg["layer_types"] = ["sliding_attention"] * cfg["num_hidden_layers"]
    cfg["query_pre_attn_scalar"] = cfg["head_dim"]
    (folder / "config.json").write_text(json.dumps(cfg))
  path = _write_gguf(folder, tmp_path / "m.gguf", ARCH[name.split("_")[0]])
  ref = np.load(folder / "reference.npz")
  a = models.from_pretrained(folder, with_tokenizer=False)
  b = models.from_pretrained(path, with_tokenizer=False)
  # The same config but for the token ids, which a GGUF file keeps with
  # its tokenizer (this one has none).
  ids = {"eos_token_ids": (), "pad_token_id": None}
  # LongRoPE's attention factor: float32 in the file, float64 in the folder.
  factor = a.config.rope.attention_factor
  assert b.config.rope.attention_factor == pytest.approx(factor, rel=1e-7)
  rope = dataclasses.replace(b.config.rope, attention_factor=factor)
  assert rope == a.config.rope
  ids["rope"] = rope
  assert dataclasses.replace(b.config, **ids) == dataclasses.replace(
    a.config, **ids
  )
  want = a.model.apply(a.variables, ref["input_ids"])
  got = b.model.apply(b.variables, ref["input_ids"])
  assert _rel_error(got, np.asarray(want)) <= 1e-6


def test_bad_configs_and_checkpoints_name_the_field_or_tensor(tmp_path):
  raw = json.loads((HF / "gemma3_text" / "config.json").read_text())
  with pytest.raises(ConfigError, match="'layer_types' must list 3 layers"):
    models.from_dict(dict(raw, layer_types=["full_attention"]))
  with pytest.raises(ConfigError, match="'attn_logit_softcapping'"):
    models.from_dict(dict(raw, attn_logit_softcapping=50.0))
  qwen = json.loads((HF / "qwen3" / "config.json").read_text())
  with pytest.raises(ConfigError, match=r"'num_attention_heads' \(6\) must"):
    models.from_dict(dict(qwen, head_dim=None, num_attention_heads=6))
  phi = json.loads((HF / "phi3" / "config.json").read_text())
  with pytest.raises(ConfigError, match="'resid_pdrop' is 0.1"):
    models.from_dict(dict(phi, resid_pdrop=0.1))
  folder = tmp_path / "qwen3"
  shutil.copytree(HF / "qwen3", folder)
  tensors = safetensors.numpy.load_file(folder / "model.safetensors")
  del tensors["model.layers.1.self_attn.q_norm.weight"]
  safetensors.numpy.save_file(tensors, folder / "model.safetensors")
  with pytest.raises(CheckpointError, match=r"layers\.1\.self_attn\.q_norm"):
    models.from_pretrained(folder)
