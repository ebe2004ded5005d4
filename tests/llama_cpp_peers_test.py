"""Our GGUF files run by llama.cpp itself (peers extra: llama-cpp-python).

.venv-peers/bin/python -m pytest -m peers tests/llama_cpp_peers_test.py -s

Skipped unless `llama_cpp` imports (llama-cpp-python 0.3.36, which builds
llama.cpp from source). Reference: llama.cpp on the CPU, 2 threads, one
prompt at a time, against our model over the same file
(`models.from_pretrained`), so only the two programs' arithmetic differs.
The run is two steps of the main job on SmolLM2-135M-Instruct (LoRA r=4 on
all 210 linear layers over the float weights of its Q4_1 file, learning
rate 2e-2: adapters well off zero); the QA-LoRA run is configs/qa_lora.py
for two steps, exported exactly as Q4_1.

Tolerances (max-norm error of the last position's logits over the largest
logit), from what llama.cpp's CPU kernels round:

- F32 file, F32 KV cache: nothing is rounded below float32; sums run in
  another order (SIMD partial sums, its own expf in softmax and SiLU), so
  the two differ by float32 rounding amplified through 30 layers: 1e-4.
- F32 file, llama.cpp's default F16 KV cache: every key and value is
  rounded to float16, a relative error of up to 2**-11 = 4.9e-4 per
  element, carried into every later layer: 4 * 2**-11 = 2.0e-3.
- Gemma 3's F32 file, F32 KV cache: llama.cpp's CPU GEGLU rounds the
  gate to float16 and reads GELU from a float16 table (`GGML_GELU_FP16`,
  ggml_vec_geglu_f32), 2**-11 relative per element: 4 * 2**-11 = 2.0e-3.
- F16 file: a float16 matrix multiplies activations converted to float16
  (GGML's vec_dot_type of F16), 2**-11 relative per element on every
  product, besides the cache's: 8 * 2**-11 = 3.9e-3.
- Q8_0 and Q4_1 files: activations are quantized to 8 bits per block of
  32 (Q8_0 / Q8_1: an error of up to amax / 254 per element, ~1e-3 of a
  product) in every product, compounding over 30 layers; no tight bound
  follows, so 0.1 only guards the layout (a wrong one errs by ~1), and the
  greedy agreement is measured and printed.

Greedy: 16 new tokens (or up to end-of-turn) on each of 10 prompts; the
float files must agree on at least 9 of 10.

Measured (2 CPU cores, AMD EPYC, 2026-12-07; 40 min with other work on
the machine): merged F32 1.8e-6 (6.0e-4 with the F16 cache), 10 of 10;
F16 1.6e-3, 9 of 10; Q8_0 3.8e-2, 4 of 10; float32 base + our LoRA file
2.5e-6 (8.7e-4), 10 of 10; the shipped Q4_1 base + our LoRA file 3.6e-2,
6 of 10; QA-LoRA's Q4_1 export 2.6e-2, 6 of 10, perplexity 11.04 in
llama.cpp against our 10.96 (+0.75%); Gemma 3 merged F32 4.7e-4 and
float32 base + LoRA file 5.5e-4, 10 of 10 each.
"""

import math
import pathlib

import numpy as np
import pytest

llama_cpp = pytest.importorskip("llama_cpp")

from qlora_jax import models  # noqa: E402
from qlora_jax.data import chat  # noqa: E402
from qlora_jax.models import generation  # noqa: E402

pytestmark = pytest.mark.peers

THREADS = 2
NEW = 16
F32_CACHE = 0  # GGML_TYPE_F32, for type_k / type_v
TOL = {
  ("float32", "f32_cache"): 1e-4,
  ("float32", "f16_cache"): 4 * 2**-11,
  ("float16", "f16_cache"): 8 * 2**-11,
  ("gemma3 float32", "f32_cache"): 4 * 2**-11,
}
GUARD = 0.1  # 8-bit activations: the layout's guard, not a bound
PROMPTS = [
  "<|im_start|>user\nWhich standard-library package parses JSON?<|im_end|>\n"
  "<|im_start|>assistant\n",
  "<|im_start|>user\nWrite a haiku about the sea.<|im_end|>\n"
  "<|im_start|>assistant\n",
  "<|im_start|>system\nYou answer in one word.<|im_end|>\n<|im_start|>user\n"
  "What is the capital of France?<|im_end|>\n<|im_start|>assistant\n",
  "<|im_start|>user\nExplain what a hash table is.<|im_end|>\n"
  "<|im_start|>assistant\n",
  "def fibonacci(n):\n    if n < 2:\n        return n\n",
  "import os\nimport sys\n\n\ndef main():\n",
  "The quick brown fox jumps over the lazy dog. The dog",
  "Once upon a time, in a small village by the sea, there lived",
  "1, 2, 3, 5, 8, 13, 21,",
  "Q: What is 12 times 12?\nA:",
]
TEXTS = [
  "Hello, world!",
  "  leading spaces, trailing tabs\t\t",
  "def f(x):\n    return x ** 2  # squared\n\n\n",
  "naïve café, résumé; 你好世界 🙂 Ωµ∂",
  "<|im_start|>user\nhi<|im_end|>\n<|endoftext|>",
  "numbers 3.14159 2026-12-07 1,000,000",
  "MixedCASE camelCase snake_case kebab-case",
  "\n\n\n   \r\n",
  "emoji 👩‍💻🚀 and symbols ©®™ ≤≥≠",
  "http://example.com/path?query=1&x=y#frag",
]


def _llama(path, lora=None, cache=None, vocab_only=False, n_ctx=256):
  kw = {"type_k": cache, "type_v": cache} if cache is not None else {}
  return llama_cpp.Llama(
    str(path),
    lora_path=str(lora) if lora else None,
    n_ctx=n_ctx,
    n_threads=THREADS,
    n_threads_batch=THREADS,
    logits_all=True,
    vocab_only=vocab_only,
    verbose=False,
    **kw,
  )


def _their_logits(llm, ids) -> np.ndarray:
  """llama.cpp's logits [len(ids), V] of one prompt."""
  llm.reset()
  llm.eval(list(map(int, ids)))
  return np.array(llm.scores[: len(ids)], np.float32)


def _their_greedy(llm, ids, eos: int) -> list[int]:
  llm.reset()
  llm.eval(list(map(int, ids)))
  out = []
  for _ in range(NEW):
    token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
    out.append(token)
    if token == eos:
      break
    llm.eval([token])
  return out


def _our_greedy(lm, prompts, eos: int) -> list[list[int]]:
  """Our greedy continuations of every prompt, one left-padded batch."""
  width = max(len(p) for p in prompts)
  ids = np.zeros((len(prompts), width), np.int32)
  mask = np.zeros_like(ids)
  for i, p in enumerate(prompts):
    ids[i, width - len(p) :], mask[i, width - len(p) :] = p, 1
  new = np.asarray(
    generation.generate(
      lm.model, lm.variables, ids, mask, max_new_tokens=NEW, eos_token_id=eos
    )
  )
  out = []
  for row in new.tolist():
    out.append(row[: row.index(eos) + 1] if eos in row else row)
  return out


def rel_error(ours, ref) -> float:
  return float(np.abs(np.asarray(ours) - ref).max() / np.abs(ref).max())


class Ours:
  """Our model over a GGUF file: tokenized prompts, last-position logits of
  the prompts cut to one length, greedy continuations."""

  def __init__(self, path):
    self.lm = models.from_pretrained(path, scan_layers=True)
    tok = models.gguf_tokenizer(path)
    self.eos = tok.special_ids["eos_token"]
    self.prompts = [tok.tokenizer.encode(p).ids for p in PROMPTS]
    n = min(len(p) for p in self.prompts)
    self.cut = np.array([p[:n] for p in self.prompts], np.int32)
    logits = self.lm.model.apply(self.lm.variables, self.cut)
    self.last = np.asarray(logits[:, -1], np.float32)
    self.greedy = _our_greedy(self.lm, self.prompts, self.eos)


def _compare(ours: Ours, llm, what: str) -> tuple[float, int]:
  """(max rel error of the last logits over the cut prompts, greedy
  continuations equal to ours out of 10); printed."""
  theirs = np.stack([_their_logits(llm, p)[-1] for p in ours.cut])
  err = rel_error(theirs, ours.last)
  same = sum(
    _their_greedy(llm, p, ours.eos) == g
    for p, g in zip(ours.prompts, ours.greedy, strict=True)
  )
  print(f"{what}: logits max rel error {err:.2e}, greedy {same}/10 identical")
  return err, same


def _float32_base(shipped, path) -> pathlib.Path:
  """The shipped GGUF file's weights as we load them, as a float32 file."""
  from qlora_jax.interop import gguf_export, hf_export, naming  # noqa: PLC0415

  base = models.from_pretrained(shipped, with_tokenizer=False)
  names = naming.Names(models.ModelSpec(base.config, "causal_lm"), False)
  tensors, _, _ = hf_export.merged_tensors(base.variables, names, "float32")
  return gguf_export.write_gguf(path, tensors, shipped)


@pytest.fixture(scope="module")
def work(tmp_path_factory):
  return tmp_path_factory.mktemp("llama_cpp")


def _train(config, folder: pathlib.Path, lr: float = 2e-2) -> pathlib.Path:
  from qlora_jax.engine import train  # noqa: PLC0415

  config.data.questions_per_class = 2
  config.data.eval_questions_per_class = 1
  config.data.eval_generate = 0
  config.train.steps = 2
  config.train.eval_every = 2
  config.opt.learning_rate = lr
  train.train_and_evaluate(config, str(folder))
  return folder


@pytest.fixture(scope="module")
def smollm2_run(work):
  from configs import default  # noqa: PLC0415

  config = default.get_config()
  config.quant.data_type = "none"
  return _train(config, work / "run")


@pytest.fixture(scope="module")
def merged(smollm2_run, work):
  """{dtype: the run's merged GGUF export}."""
  from qlora_jax.engine import export  # noqa: PLC0415

  return {
    dtype: export.export_gguf(smollm2_run, work / f"merged_{dtype}.gguf", dtype)
    for dtype in ("float32", "float16", "q8_0")
  }


@pytest.fixture(scope="module")
def ours_f32(merged):
  return Ours(merged["float32"])


def test_float32_merged_export(merged, ours_f32):
  for cache, name in ((F32_CACHE, "f32_cache"), (None, "f16_cache")):
    llm = _llama(merged["float32"], cache=cache)
    err, same = _compare(ours_f32, llm, f"merged F32, {name}")
    assert err <= TOL[("float32", name)]
    assert same >= 9


def test_float16_merged_export(merged):
  err, same = _compare(
    Ours(merged["float16"]), _llama(merged["float16"]), "merged F16"
  )
  assert err <= TOL[("float16", "f16_cache")]
  assert same >= 9


def test_q8_0_merged_export_agreement(merged):
  """Activations quantized to Q8_0 in every product: measured, not bound."""
  err, _ = _compare(Ours(merged["q8_0"]), _llama(merged["q8_0"]), "Q8_0")
  assert err <= GUARD


def test_lora_file_over_the_base_is_the_merged_model(
  smollm2_run, work, ours_f32
):
  """llama.cpp applying our LoRA GGUF over a float32 base file gives our
  merged float32 model's tokens; over the shipped Q4_1 file (activations
  quantized to Q8_1 in the base's products), the agreement is printed."""
  from qlora_jax.engine import export  # noqa: PLC0415

  lora = work / "lora.gguf"
  info = export.export_gguf_lora(smollm2_run, lora)
  print(f"LoRA GGUF: {info}, {lora.stat().st_size / 1e6:.2f} MB")
  shipped = models.smollm2_path()
  base_f32 = _float32_base(shipped, work / "base_f32.gguf")
  for cache, name in ((F32_CACHE, "f32_cache"), (None, "f16_cache")):
    llm = _llama(base_f32, lora=lora, cache=cache)
    err, same = _compare(ours_f32, llm, f"F32 base + LoRA GGUF, {name}")
    assert err <= TOL[("float32", name)]
    assert same >= 9
  llm = _llama(shipped, lora=lora)
  err, _ = _compare(ours_f32, llm, "shipped Q4_1 base + LoRA (vs merged F32)")
  assert err <= GUARD
  # The adapter is applied (a test that can fail): the base alone differs.
  plain = _llama(base_f32, cache=F32_CACHE)
  theirs = np.stack([_their_logits(plain, p)[-1] for p in ours_f32.cut])
  assert rel_error(theirs, ours_f32.last) > 1e-2


def test_tokenizer_and_chat_template(merged):
  path = merged["float32"]
  tok = models.gguf_tokenizer(path)
  llm = _llama(path, vocab_only=True)
  for text in TEXTS + PROMPTS:
    theirs = llm.tokenize(text.encode(), add_bos=False, special=True)
    assert theirs == tok.tokenizer.encode(text).ids, text
  template = llama_cpp.llama_model_chat_template(llm.model, None).decode()
  assert template == tok.chat_template
  messages = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Which package parses JSON?"},
    {"role": "assistant", "content": "json"},
    {"role": "user", "content": "And CSV files?"},
  ]
  array = (llama_cpp.llama_chat_message * len(messages))(
    *[
      llama_cpp.llama_chat_message(m["role"].encode(), m["content"].encode())
      for m in messages
    ]
  )
  buf = (llama_cpp.ctypes.c_char * 4096)()
  n = llama_cpp.llama_chat_apply_template(
    template.encode(), array, len(messages), True, buf, len(buf)
  )
  assert 0 < n <= len(buf)
  theirs = bytes(buf[:n]).decode()
  ours = chat.render(tok.chat_template, messages, add_generation_prompt=True)
  print(f"chat template, llama.cpp:\n{theirs}")
  assert theirs == ours


@pytest.fixture(scope="module")
def qa_q4_1(work):
  """The QA-LoRA run's exact merge, written as Q4_1."""
  from configs import qa_lora  # noqa: PLC0415
  from qlora_jax.engine import export  # noqa: PLC0415

  run = _train(qa_lora.get_config(), work / "qa_run")
  return export.export_gguf(run, work / "qa_q4_1.gguf")


def test_q4_1_export_agreement_and_perplexity(qa_q4_1):
  """Greedy agreement printed; perplexity on held-out text (Python's own
  colorsys.py, never trained on: 4 windows of 128 tokens) within 1%."""
  import colorsys  # noqa: PLC0415

  ours = Ours(qa_q4_1)
  llm = _llama(qa_q4_1)
  err, _ = _compare(ours, llm, "QA-LoRA Q4_1")
  assert err <= GUARD
  text = pathlib.Path(colorsys.__file__).read_text()
  ids = models.gguf_tokenizer(qa_q4_1).tokenizer.encode(text).ids
  windows = np.array([ids[i * 128 : (i + 1) * 128] for i in range(4)])
  assert windows.shape == (4, 128)
  logits = np.asarray(ours.lm.model.apply(ours.lm.variables, windows))
  theirs = np.stack([_their_logits(llm, w) for w in windows])

  def perplexity(x):
    x = x[:, :-1].astype(np.float64)
    top = x.max(-1, keepdims=True)
    logz = top[..., 0] + np.log(np.exp(x - top).sum(-1))
    picked = np.take_along_axis(x, windows[:, 1:, None], -1)[..., 0]
    return math.exp(float((logz - picked).mean()))

  mine, other = perplexity(logits), perplexity(theirs)
  print(f"Q4_1 perplexity: ours {mine:.4f}, llama.cpp {other:.4f}")
  assert abs(other / mine - 1) <= 0.01


def test_gemma3(work):
  """Gemma 3 270M (base model, its Q4_K_M file): two LoRA steps over its
  float weights (learning rate 5e-3); the merged F32 export and the LoRA
  GGUF over a float32 base in llama.cpp, with an F32 KV cache; its
  tokenizer on our file."""
  from configs import gemma3_qlora  # noqa: PLC0415
  from qlora_jax.engine import export  # noqa: PLC0415

  config = gemma3_qlora.get_config()
  config.quant.data_type = "none"
  config.data.max_length = 64
  config.train.batch_size = 4
  run = _train(config, work / "gemma3_run", lr=5e-3)
  merged = export.export_gguf(run, work / "gemma3_f32.gguf")
  lora = work / "gemma3_lora.gguf"
  export.export_gguf_lora(run, lora)
  ours = Ours(merged)
  err, same = _compare(ours, _llama(merged, cache=F32_CACHE), "gemma3 F32")
  assert err <= TOL[("gemma3 float32", "f32_cache")]
  assert same >= 9
  base = _float32_base(models.gemma3_path(), work / "gemma3_base_f32.gguf")
  llm = _llama(base, lora=lora, cache=F32_CACHE)
  err, same = _compare(ours, llm, "gemma3 F32 base + LoRA GGUF")
  assert err <= TOL[("gemma3 float32", "f32_cache")]
  assert same >= 9
  tok = models.gguf_tokenizer(merged).tokenizer
  llm = _llama(merged, vocab_only=True)
  for text in TEXTS + PROMPTS:
    theirs = llm.tokenize(text.encode(), add_bos=False, special=True)
    assert theirs == tok.encode(text, add_special_tokens=False).ids, text
