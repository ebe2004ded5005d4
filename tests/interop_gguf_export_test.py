"""Merged models written as GGUF files (interop.gguf_export), read back.

The base is a tiny GGUF file with random weights (tests/models_gguf_test,
q/k permuted as llama.cpp's converter does). References: a float32 export
read back with our GGUF reader (itself checked against the tensors before
permutation in models_gguf_test) gives the in-memory merged model's logits
exactly; other types give exactly the `gguf` package's own quantize ->
dequantize round trip of the merged tensors; metadata, tokenizer and chat
template are the base file's.
"""

import json
import os
import subprocess
import sys

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q

from qlora_jax import interop, models
from qlora_jax.engine import export, restore, train
from qlora_jax.interop import gguf_export, hf_export, naming
from qlora_jax.interop.chat_template import EOT_KEY, TEMPLATE_KEY, RunTemplate
from tests import tiny_config
from tests.interop_helpers import randomize
from tests.models_gguf_test import TEXTS, hf_tensors, write_gguf

IDS = np.array([[1, 17, 4, 42, 8, 2, 33, 9], [1, 5, 6, 7, 80, 12, 3, 4]])
NF4 = {"data_type": "nf4", "block_size": 32, "double_quant": True}
LORA = {"rank": 4, "alpha": 8}


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def base(request, tmp_path_factory):
  arch = request.param
  tensors = hf_tensors(arch, tied=arch == "qwen2", seed=3)
  path = tmp_path_factory.mktemp(arch) / "base.gguf"
  return write_gguf(path, tensors, arch)


def _merged(lm):
  merged, plan = interop.merge(lm.variables, lm.plan)
  names = naming.Names(models.ModelSpec(lm.config, "causal_lm"), False)
  tensors, _, _ = hf_export.merged_tensors(merged, names, "float32")
  return tensors, interop.merged_model(lm.model, plan).apply(merged, IDS)


def test_float32_export_reads_back_as_the_merged_model(base, tmp_path):
  lm = randomize(models.from_pretrained(base, lora=LORA, quant=NF4))
  tensors, want = _merged(lm)
  adapted = lm.model.apply(lm.variables, IDS)
  assert np.abs(want - adapted).max() < 1e-5 * np.abs(adapted).max()
  out = gguf_export.write_gguf(tmp_path / "merged.gguf", tensors, base)
  back = models.from_pretrained(out)
  np.testing.assert_array_equal(back.model.apply(back.variables, IDS), want)
  # The base's metadata, tokenizer and template travel; the type is new.
  old, new = models.read_gguf(base), dict(models.read_gguf(out).metadata)
  assert new.pop("general.file_type") == 0  # ALL_F32
  assert new == {
    k: v for k, v in old.metadata.items() if k != "general.file_type"
  }
  for text in TEXTS:
    assert (
      models.gguf_tokenizer(out).tokenizer.encode(text).ids
      == models.gguf_tokenizer(base).tokenizer.encode(text).ids
    )
  assert not (tmp_path / "merged.gguf.partial").exists()


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "q8_0"])
def test_types_are_the_gguf_packages_own_round_trip(base, dtype, tmp_path):
  tensors = hf_tensors("llama", tied=False, seed=4)
  if models.read_gguf(base).architecture == "qwen2":
    tensors = hf_tensors("qwen2", tied=True, seed=4)
  out = gguf_export.write_gguf(tmp_path / "x.gguf", tensors, base, dtype)
  back = models.GGUFCheckpoint(out)
  qtype = gguf_export.TYPES[dtype]
  for key, value in tensors.items():
    kind = qtype if value.ndim == 2 else Q.F32
    assert back.gguf_type(key) == kind.name, key
    ref = gguf.quants.dequantize(gguf.quants.quantize(value, kind), kind)
    np.testing.assert_array_equal(back.read(key), ref.reshape(value.shape))


def test_bad_tensors_name_the_tensor(base, tmp_path):
  tensors = dict(hf_tensors("llama", tied=False))
  with pytest.raises(ValueError, match="'model.extra.weight' has no GGUF"):
    gguf_export.write_gguf(
      tmp_path / "a.gguf", {"model.extra.weight": np.zeros((4, 4))}, base
    )
  key = "model.layers.1.mlp.up_proj.weight"
  with pytest.raises(ValueError, match=f"{key!r} has shape \\(96, 32\\)"):
    gguf_export.write_gguf(
      tmp_path / "b.gguf", {key: tensors[key][:, :32]}, base
    )
  with pytest.raises(ValueError, match="--dtype: 'q4_k'"):
    gguf_export.write_gguf(tmp_path / "c.gguf", tensors, base, "q4_k")
  assert not list(tmp_path.iterdir())  # nothing half-written


@pytest.fixture(scope="module")
def gguf_run(tmp_path_factory):
  """A causal-LM run over the tiny llama GGUF (nf4 + LoRA), 2 steps."""
  folder = tmp_path_factory.mktemp("gguf_run")
  tensors = hf_tensors("llama", tied=False, seed=5)
  ckpt = write_gguf(folder / "tiny.gguf", tensors)
  with (folder / "train.jsonl").open("w") as f:
    for i in range(16):
      f.write(json.dumps({"text": " ".join(TEXTS[i % 4 : i % 4 + 2])}) + "\n")
  config = tiny_config.get_config(str(folder))
  config.data.eval_path = config.data.train_path
  config.model.checkpoint = str(ckpt)
  config.model.task = "causal_lm"
  config.data.max_length = 16
  config.train.steps = 2
  config.train.eval_every = 2
  config.opt.learning_rate = 3e-2  # adapters far from zero after 2 steps
  train.train_and_evaluate(config, str(folder / "run"))
  return folder / "run", ckpt


def test_run_export_cli_and_read_back(gguf_run, tmp_path):
  run, ckpt = gguf_run
  restored = restore.restore(run)
  tensors, want = _merged(restored.lm)
  out = tmp_path / "float.gguf"
  export.export_gguf(run, out)
  back = models.from_pretrained(out)
  np.testing.assert_array_equal(back.model.apply(back.variables, IDS), want)
  # The run's adapters changed the model: the export is not the base.
  base = models.from_pretrained(ckpt)
  plain = base.model.apply(base.variables, IDS)
  assert np.abs(plain - want).max() > 1e-3 * np.abs(want).max()
  # The command line, in q8_0; an existing file needs --overwrite.
  cmd = [sys.executable, "-m", "experiments.export", f"--workdir={run}"]
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  q8 = tmp_path / "q8.gguf"
  said = []
  for extra, code in (([], 0), ([], 1), (["--overwrite"], 0)):
    proc = subprocess.run(
      [*cmd, f"--gguf={q8}", "--dtype=q8_0", *extra],
      cwd=tiny_config.ROOT.parent,
      env=env,
      capture_output=True,
      text=True,
    )
    assert proc.returncode == code, proc.stderr[-2000:]
    said.append(proc.stderr)
  assert "exists; pass --overwrite" in said[1]
  back = models.GGUFCheckpoint(q8)
  key = "model.layers.0.self_attn.q_proj.weight"
  ref = gguf.quants.dequantize(
    gguf.quants.quantize(tensors[key], Q.Q8_0), Q.Q8_0
  )
  np.testing.assert_array_equal(back.read(key), ref)


def test_run_over_a_folder_is_refused_before_restoring(tmp_path):
  config = tiny_config.get_config(str(tmp_path))
  (tmp_path / "config.json").write_text(json.dumps(config.to_dict()))
  with pytest.raises(ValueError, match="GGUF export copies its metadata"):
    export.export_gguf(tmp_path, tmp_path / "x.gguf")


def test_a_stopped_export_leaves_no_partial_file(
  gguf_run, tmp_path, monkeypatch
):
  run, ckpt = gguf_run
  out = tmp_path / "merged.gguf"
  out.write_bytes(ckpt.read_bytes())  # a previous export
  before = out.read_bytes()
  encode, written = gguf_export._encode, []

  def encode_then_interrupt(*args):  # one tensor written, then Ctrl-C
    if written:
      raise KeyboardInterrupt
    written.append(args)
    return encode(*args)

  monkeypatch.setattr(gguf_export, "_encode", encode_then_interrupt)
  for target, overwrite in ((out, True), (tmp_path / "new.gguf", False)):
    written.clear()
    with pytest.raises(KeyboardInterrupt):
      export.export_gguf(run, target, overwrite=overwrite)
  assert out.read_bytes() == before
  assert [p.name for p in tmp_path.iterdir()] == ["merged.gguf"]


def test_a_runs_chat_template_replaces_the_bases(base, tmp_path):
  # data.chat_template named: the export carries it and its end of turn
  # in place of the base's template; "none" (text None) carries none.
  lm = models.from_pretrained(base)
  tensors, _ = _merged(lm)
  template = RunTemplate("{{ messages[0]['content'] }}<eot>", 7)
  out = gguf_export.write_gguf(
    tmp_path / "a.gguf", tensors, base, "float32", template
  )
  meta = dict(models.read_gguf(out).metadata)
  assert meta[TEMPLATE_KEY] == template.text and meta[EOT_KEY] == 7
  assert models.read_gguf(base).metadata[TEMPLATE_KEY] != template.text
  none = RunTemplate(None)
  out = gguf_export.write_gguf(
    tmp_path / "b.gguf", tensors, base, "float32", none
  )
  meta = dict(models.read_gguf(out).metadata)
  assert TEMPLATE_KEY not in meta and EOT_KEY not in meta
