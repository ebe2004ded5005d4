"""Our exports loaded by PEFT and transformers themselves (peers extra).

.venv-peers/bin/python -m pytest -m peers tests/interop_peers_test.py

Skipped unless torch, transformers and peft import. Reference: PEFT 0.21.2
/ transformers 5.24 on the CPU in float32 (eager attention). Tolerance:
max-norm relative error <= 1e-4 against this codebase's logits (quantization
off for adapters; nf4 for the merged model, whose float export transformers
loads).
"""

import json
import pathlib

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from qlora_jax import interop, models  # noqa: E402
from qlora_jax import nn as qnn  # noqa: E402
from tests.interop_helpers import IDS, randomize, rel_error  # noqa: E402

pytestmark = pytest.mark.peers
DATA = pathlib.Path(__file__).parent / "data"
NF4 = {"data_type": "nf4", "block_size": 64, "double_quant": True}
TOL = 1e-4


def _hf(folder, cls=None):
  cls = cls or transformers.AutoModelForCausalLM
  return cls.from_pretrained(
    str(folder), dtype=torch.float32, attn_implementation="eager"
  ).eval()


@pytest.mark.parametrize(
  "name,lora",
  [
    (
      "llama_gqa",
      {"rank": 4, "alpha": 8, "rank_pattern": {"down_proj": 2}},
    ),
    ("llama_gqa", {"rank": 4, "alpha": 6, "rslora": True, "dora": True}),
    ("gpt2", {"targets": ["c_attn", "c_proj", "c_fc"], "rank": 4}),
    ("qwen3", {"rank": 4, "alpha": 8}),
    ("gemma3_text", {"rank": 4, "alpha": 8}),
    ("phi3", {"rank": 4, "alpha": 8, "rank_pattern": {"gate_up_proj": 2}}),
  ],
  ids=[
    "llama_patterns",
    "llama_dora_rslora",
    "gpt2_conv1d",
    "qwen3",
    "gemma3_text",
    "phi3_fused",
  ],
)
def test_peft_loads_our_adapter(tmp_path, name, lora):
  base = DATA / "hf" / name
  lm = randomize(models.from_pretrained(base, lora=lora))
  trainable, _ = qnn.split_trainable(lm.variables)
  spec = models.ModelSpec(lm.config, "causal_lm")
  interop.write_adapter(tmp_path, trainable, lm.plan, spec, False, str(base))
  ours = lm.model.apply(lm.variables, IDS)
  model = peft.PeftModel.from_pretrained(_hf(base), str(tmp_path)).eval()
  with torch.no_grad():
    theirs = model(torch.tensor(IDS)).logits.numpy()
  err = rel_error(ours, theirs)
  print(f"{name} {sorted(lora)}: PEFT vs ours max rel error {err:.2e}")
  assert err <= TOL
  # And the adapter changes the output (a test that can fail).
  with torch.no_grad(), model.disable_adapter():
    plain = model(torch.tensor(IDS)).logits.numpy()
  assert rel_error(plain, theirs) > 1e-2


def test_peft_loads_our_bert_adapter(tmp_path):
  base = DATA / "hf" / "bert"
  lm = randomize(
    models.from_pretrained(
      base, task="embedding", lora={"targets": "all-linear", "rank": 4}
    )
  )
  trainable, _ = qnn.split_trainable(lm.variables)
  spec = models.ModelSpec(lm.config, "embedding")
  interop.write_adapter(tmp_path, trainable, lm.plan, spec, False, str(base))
  ref = np.load(base / "reference.npz")
  ids, mask = ref["input_ids"], ref["attention_mask"]
  types = ref["token_type_ids"]
  ours = lm.model.apply(
    lm.variables, ids, mask, None, types, method=models.BertModel.hidden_states
  )
  hf = _hf(base, transformers.BertModel)
  model = peft.PeftModel.from_pretrained(hf, str(tmp_path)).eval()
  with torch.no_grad():
    out = model(
      input_ids=torch.tensor(ids),
      attention_mask=torch.tensor(mask),
      token_type_ids=torch.tensor(types),
    ).last_hidden_state.numpy()
  keep = mask.astype(bool)  # padded positions differ by design
  err = rel_error(np.asarray(ours)[keep], out[keep])
  print(f"bert: PEFT vs ours max rel error {err:.2e}")
  assert err <= TOL


@pytest.mark.parametrize(
  "name", ["llama_gqa", "qwen3", "gemma3_text", "phi3", "phi3_longrope"]
)
def test_transformers_loads_the_nf4_merged_model(tmp_path, name):
  """The merged folder of every Llama-family layout (Qwen3's q/k norms,
  Gemma 3's (1 + w) sandwich norms and sliding layers, Phi-3's fused
  qkv_proj / gate_up_proj, its LongRoPE config) in transformers."""
  base = DATA / "hf" / name.removesuffix("_longrope")
  if name == "phi3_longrope":
    copy = tmp_path / "base"
    copy.mkdir()
    for f in ("model.safetensors", "tokenizer.json"):
      (copy / f).symlink_to(base / f)
    (copy / "config.json").write_text(
      (base / "config_longrope.json").read_text()
    )
    base, tmp_path = copy, tmp_path / "merged"
  lm = randomize(
    models.from_pretrained(base, lora={"rank": 4, "alpha": 8}, quant=NF4)
  )
  merged, plan = interop.merge(lm.variables, lm.plan)
  ours = interop.merged_model(lm.model, plan).apply(merged, IDS)
  spec = models.ModelSpec(lm.config, "causal_lm")
  raw = json.loads((base / "config.json").read_text())
  interop.write_merged(tmp_path, merged, spec, False, base=base, raw_config=raw)
  with torch.no_grad():
    theirs = _hf(tmp_path)(torch.tensor(IDS)).logits.numpy()
  err = rel_error(ours, theirs)
  print(f"{name} nf4 merged: transformers vs ours max rel error {err:.2e}")
  assert err <= TOL
  unmerged = lm.model.apply(lm.variables, IDS)
  print(f"nf4 merged vs unmerged (ours): {rel_error(unmerged, theirs):.2e}")
  assert rel_error(unmerged, theirs) <= TOL


# The real SmolLM2-135M-Instruct: a run of the main job (LoRA r=4 on all
# 210 linear layers over the float GGUF weights, 2 steps at a learning rate
# that moves the adapters well off zero), its PEFT adapter over the folder
# experiments.convert writes, and its merged GGUF export in transformers.
PROMPTS = [
  "<|im_start|>user\nWhich standard-library package parses JSON?<|im_end|>\n",
  "def fibonacci(n):\n    if n < 2:\n        return n\n",
]


def _trained(config, gguf, tmp_path_factory, name):
  """Trains `config` (a run over the GGUF file `gguf`), converts the file to
  a Hugging Face folder; returns (work folder, converted folder, the
  PROMPTS' ids cut to one length, our logits of the restored run)."""
  from qlora_jax.engine import restore, train  # noqa: PLC0415
  from qlora_jax.interop import gguf_convert  # noqa: PLC0415

  work = tmp_path_factory.mktemp(name)
  train.train_and_evaluate(config, str(work / "run"))
  folder = gguf_convert.convert(gguf, work / "hf")
  restored = restore.restore(work / "run")
  tok = models.gguf_tokenizer(gguf).tokenizer
  ids = [tok.encode(p).ids for p in PROMPTS]
  n = min(len(i) for i in ids)
  ids = np.array([i[:n] for i in ids])
  ours = np.asarray(restored.lm.model.apply(restored.lm.variables, ids))
  return work, folder, ids, ours


@pytest.fixture(scope="module")
def smollm2_run(tmp_path_factory):
  from configs import default  # noqa: PLC0415

  config = default.get_config()
  config.quant.data_type = "none"
  config.data.questions_per_class = 2
  config.data.eval_questions_per_class = 1
  config.data.eval_generate = 0
  config.train.steps = 2
  config.train.eval_every = 2
  config.opt.learning_rate = 2e-2
  return _trained(config, models.smollm2_path(), tmp_path_factory, "smollm2")


def test_peft_loads_a_smollm2_runs_adapter_over_the_converted_folder(
  smollm2_run,
):
  from qlora_jax.engine import export  # noqa: PLC0415

  work, folder, ids, ours = smollm2_run
  export.export_adapter(work / "run", work / "adapter")
  model = peft.PeftModel.from_pretrained(_hf(folder), str(work / "adapter"))
  with torch.no_grad():
    theirs = model.eval()(torch.tensor(ids)).logits.numpy()
    with model.disable_adapter():
      plain = model(torch.tensor(ids)).logits.numpy()
  err = rel_error(ours, theirs)
  print(f"smollm2 adapter: PEFT vs ours max rel error {err:.2e}")
  assert err <= TOL
  print(f"smollm2 adapter: adapted vs base {rel_error(plain, theirs):.2e}")
  assert rel_error(plain, theirs) > 1e-3  # the adapters are not zero


def test_transformers_loads_a_smollm2_runs_gguf_export(smollm2_run):
  from qlora_jax.engine import export  # noqa: PLC0415

  work, _, ids, ours = smollm2_run
  out = export.export_gguf(work / "run", work / "gguf" / "merged.gguf")
  model = transformers.AutoModelForCausalLM.from_pretrained(
    str(out.parent),
    gguf_file=out.name,
    dtype=torch.float32,
    attn_implementation="eager",
  ).eval()
  with torch.no_grad():
    theirs = model(torch.tensor(ids)).logits.numpy()
  err = rel_error(ours, theirs)
  print(f"smollm2 merged GGUF: transformers vs ours max rel error {err:.2e}")
  assert err <= TOL
  tok = transformers.AutoTokenizer.from_pretrained(
    str(out.parent), gguf_file=out.name
  )
  want = models.gguf_tokenizer(models.smollm2_path())
  assert tok.chat_template == want.chat_template
  assert [tok(p)["input_ids"] for p in PROMPTS] == [
    want.tokenizer.encode(p).ids for p in PROMPTS
  ]


@pytest.fixture(scope="module")
def gemma3_run(tmp_path_factory):
  """Two steps of LoRA (float base) on the real Gemma 3 270M base model,
  its GGUF file converted to a Hugging Face folder, and our logits of the
  restored run on three prompts."""
  from configs import gemma3_qlora  # noqa: PLC0415

  config = gemma3_qlora.get_config()
  config.quant.data_type = "none"
  config.data.max_length = 64
  config.data.questions_per_class = 1
  config.data.eval_questions_per_class = 1
  config.data.eval_generate = 0
  config.train.batch_size = 4
  config.train.steps = 2
  config.train.eval_every = 2
  config.opt.learning_rate = 2e-2
  return _trained(config, models.gemma3_path(), tmp_path_factory, "gemma3")


def test_transformers_loads_the_converted_gemma3_folder(gemma3_run):
  """The folder `experiments.convert` writes from the GGUF file: config,
  tensors (norms back to w) and the SentencePiece tokenizer."""
  work, folder, ids, _ = gemma3_run
  base = models.from_pretrained(folder, with_tokenizer=False)
  ours = np.asarray(base.model.apply(base.variables, ids))
  with torch.no_grad():
    theirs = _hf(folder)(torch.tensor(ids)).logits.numpy()
  err = rel_error(ours, theirs)
  print(f"gemma3 converted folder: transformers vs ours {err:.2e}")
  assert err <= TOL
  tok = transformers.AutoTokenizer.from_pretrained(str(folder))
  want = models.gguf_tokenizer(models.gemma3_path()).tokenizer
  assert [tok(p)["input_ids"] for p in PROMPTS] == [
    want.encode(p).ids for p in PROMPTS
  ]


def test_peft_loads_a_gemma3_runs_adapter_over_the_converted_folder(
  gemma3_run,
):
  from qlora_jax.engine import export  # noqa: PLC0415

  work, folder, ids, ours = gemma3_run
  export.export_adapter(work / "run", work / "adapter")
  model = peft.PeftModel.from_pretrained(_hf(folder), str(work / "adapter"))
  with torch.no_grad():
    theirs = model.eval()(torch.tensor(ids)).logits.numpy()
    with model.disable_adapter():
      plain = model(torch.tensor(ids)).logits.numpy()
  err = rel_error(ours, theirs)
  print(f"gemma3 adapter: PEFT vs ours max rel error {err:.2e}")
  assert err <= TOL
  assert rel_error(plain, theirs) > 1e-3  # the adapters are not zero


def test_transformers_loads_a_gemma3_runs_merged_gguf_export(gemma3_run):
  """The merged run as a GGUF file with Gemma's 1 + w norms, read by
  transformers' GGUF loader."""
  from qlora_jax.engine import export  # noqa: PLC0415

  work, _, ids, ours = gemma3_run
  out = export.export_gguf(work / "run", work / "gguf" / "merged.gguf")
  model = transformers.AutoModelForCausalLM.from_pretrained(
    str(out.parent),
    gguf_file=out.name,
    dtype=torch.float32,
    attn_implementation="eager",
  ).eval()
  with torch.no_grad():
    theirs = model(torch.tensor(ids)).logits.numpy()
  err = rel_error(ours, theirs)
  print(f"gemma3 merged GGUF: transformers vs ours max rel error {err:.2e}")
  assert err <= TOL
