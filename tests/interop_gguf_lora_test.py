"""Adapters written as llama.cpp LoRA GGUF files (interop.gguf_lora).

The base is a tiny GGUF file with random weights (tests/models_gguf_test,
q/k permuted as llama.cpp's converter does). Reference: llama.cpp's own
rule for applying a LoRA file (src/llama-graph.cpp `build_lora_mm`: the
base product plus alpha / r * lora_b @ (lora_a @ x), r = lora_b's columns)
computed here in NumPy from the file as the `gguf` package reads it, over
the base file's tensors as the `gguf` package dequantizes them, equals the
merged model's weights as our float32 GGUF export stores them (llama.cpp's
names and row order), within 1e-6 of the largest weight (float32 rounding
of two different sums; the adapters move weights by ~1e-2). Tests against
llama.cpp itself are in tests/llama_cpp_peers_test.py.
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
from qlora_jax import nn as qnn
from qlora_jax.engine import export, restore, train
from qlora_jax.interop import gguf_export, gguf_lora, hf_export, naming
from tests import tiny_config
from tests.interop_helpers import randomize
from tests.models_gguf_test import TEXTS, hf_tensors, write_gguf

TOL = 1e-6
INT4 = {"data_type": "int4_asym", "block_size": 32, "double_quant": False}


def _q4_1(key: str) -> Q:
  return (
    Q.F32 if key.endswith("norm.weight") or key.endswith("bias") else Q.Q4_1
  )


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def base(request, tmp_path_factory):
  arch = request.param
  tensors = hf_tensors(arch, tied=arch == "qwen2", seed=3)
  folder = tmp_path_factory.mktemp(arch)
  return write_gguf(folder / "base.gguf", tensors, arch)


def _tensors(path) -> dict[str, np.ndarray]:
  """{name: float32 values} of a GGUF file as the `gguf` package reads it
  (GGML's dimensions reversed: NumPy [rows, columns], llama.cpp's order)."""
  out = {}
  for t in gguf.GGUFReader(path).tensors:
    shape = tuple(int(d) for d in reversed(t.shape))
    values = gguf.quants.dequantize(t.data, t.tensor_type)
    out[t.name] = np.asarray(values, np.float32).reshape(shape)
  return out


def _llama_cpp_weights(base_file, lora_file) -> dict[str, np.ndarray]:
  """Each adapted weight as llama.cpp computes with it: W + alpha / r * B A."""
  reader = gguf.GGUFReader(lora_file)
  alpha = float(reader.fields["adapter.lora.alpha"].contents())
  base, lora = _tensors(base_file), _tensors(lora_file)
  out = {}
  for name in {n.rsplit(".", 1)[0] for n in lora}:
    a, b = lora[name + ".lora_a"], lora[name + ".lora_b"]
    delta = (alpha / b.shape[1]) * (b.astype(np.float64) @ a)
    out[name] = base[name] + delta.astype(np.float32)
  return out


def _merged_file(lm, path, base_file) -> dict[str, np.ndarray]:
  merged, _ = interop.merge(lm.variables, lm.plan)
  names = naming.Names(models.ModelSpec(lm.config, "causal_lm"), False)
  tensors, _, _ = hf_export.merged_tensors(merged, names, "float32", False)
  return _tensors(gguf_export.write_gguf(path, tensors, base_file))


def _write(lm, path, base_file, dtype="float32"):
  trainable, _ = qnn.split_trainable(lm.variables)
  spec = models.ModelSpec(lm.config, "causal_lm")
  return gguf_lora.write_gguf_lora(
    path, trainable, lm.plan, spec, False, base_file, dtype
  )


def _check_against_merged(lm, base_file, tmp_path):
  info = _write(lm, tmp_path / "lora.gguf", base_file)
  applied = _llama_cpp_weights(base_file, tmp_path / "lora.gguf")
  merged = _merged_file(lm, tmp_path / "merged.gguf", base_file)
  base = _tensors(base_file)
  assert len(applied) == info["tensors"] // 2 == len(lm.plan.lora_paths())
  worst = 0.0
  for name, weight in applied.items():
    scale = np.abs(merged[name]).max()
    worst = max(worst, np.abs(weight - merged[name]).max() / scale)
    # The adapter moved the weight (a test that can fail).
    assert np.abs(merged[name] - base[name]).max() > 1e-3 * scale, name
  print(f"llama.cpp's rule vs merged export: max rel error {worst:.1e}")
  assert worst <= TOL
  return info


@pytest.mark.parametrize(
  "lora",
  [
    {"rank": 4, "alpha": 8, "rank_pattern": {"down_proj": 2}},
    {"rank": 4, "alpha": 6, "alpha_pattern": {"v_proj": 3}},
    {"rank": 4, "alpha": 6, "rslora": True, "rank_pattern": {"o_proj": 2}},
  ],
  ids=["rank_pattern", "alpha_pattern", "rslora_mixed_ranks"],
)
def test_llama_cpps_rule_over_the_base_gives_the_merged_weights(
  base, lora, tmp_path
):
  lm = randomize(models.from_pretrained(base, lora=lora), seed=1)
  info = _check_against_merged(lm, base, tmp_path)
  reader = gguf.GGUFReader(tmp_path / "lora.gguf")
  meta = {k: f.contents() for k, f in reader.fields.items()}
  assert meta["general.type"] == "adapter"
  assert meta["adapter.type"] == "lora"
  assert meta["general.architecture"] == models.read_gguf(base).architecture
  # The file's alpha is most adapters' own: their lora_b is as trained.
  alpha = lora["alpha"] * (np.sqrt(4) if lora.get("rslora") else 1)
  assert info["alpha"] == pytest.approx(alpha)
  # Every tensor is named after one of the base file's matrices.
  names = {t.name for t in reader.tensors}
  stored = set(models.read_gguf(base).tensors)
  assert {n.rsplit(".", 1)[0] for n in names} <= stored
  assert all(n.endswith((".weight.lora_a", ".weight.lora_b")) for n in names)


def test_qa_lora_is_written_as_the_plain_lora_it_computes(tmp_path):
  """QA-LoRA's A over block means ([in / 32, r]) over a Q4_1 base, whose
  codes the int4_asym model takes as stored."""
  tensors = hf_tensors("llama", tied=False, seed=6)
  base = write_gguf(tmp_path / "q4_1.gguf", tensors, kind_of=_q4_1)
  lora = {"rank": 4, "alpha": 8, "qa": True}
  lm = randomize(models.from_pretrained(base, lora=lora, quant=INT4), seed=2)
  _check_against_merged(lm, base, tmp_path)
  a = _tensors(tmp_path / "lora.gguf")["blk.0.attn_q.weight.lora_a"]
  assert a.shape == (4, 64)  # [r, in], each block's 32 columns equal
  np.testing.assert_array_equal(a[:, :32], np.repeat(a[:, :1], 32, axis=1))


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "q8_0"])
def test_types_are_the_gguf_packages_own_round_trip(base, dtype, tmp_path):
  """Matrices in the type asked for; lora_b's rows of r = 4 values are not
  whole Q8_0 blocks, so they fall back to F16 as llama.cpp's converter
  does."""
  lm = randomize(models.from_pretrained(base, lora={"rank": 4, "alpha": 8}))
  _write(lm, tmp_path / "f32.gguf", base)
  info = _write(lm, tmp_path / "x.gguf", base, dtype)
  want = gguf_export.TYPES[dtype]
  exact = _tensors(tmp_path / "f32.gguf")
  for t in gguf.GGUFReader(tmp_path / "x.gguf").tensors:
    kind = Q.F16 if want == Q.Q8_0 and t.name.endswith("lora_b") else want
    assert t.tensor_type == kind, t.name
    ref = gguf.quants.dequantize(
      gguf.quants.quantize(exact[t.name], kind), kind
    )
    got = _tensors(tmp_path / "x.gguf")[t.name]
    np.testing.assert_array_equal(got, ref.reshape(got.shape))
  assert sum(info["types"].values()) == info["tensors"]


def test_what_llama_cpp_cannot_apply_is_refused_by_name(base, tmp_path):
  spec = models.ModelSpec
  cases = [
    ({"rank": 4, "dora": True}, "is DoRA"),
    ({"rank": 4, "init": "pissa"}, "lora init 'pissa'"),
  ]
  for lora, message in cases:
    lm = models.from_pretrained(base, lora=lora)
    with pytest.raises(ValueError, match=message + ".*--gguf"):
      _write(lm, tmp_path / "a.gguf", base)
  # A trained norm besides the adapters.
  lm = models.from_pretrained(base, lora={"rank": 4})
  trainable, _ = qnn.split_trainable(lm.variables)
  norm = qnn.flatten(lm.variables)[(qnn.BASE, "model", "norm", "scale")]
  flat = qnn.flatten(trainable) | {(qnn.BASE, "model", "norm", "scale"): norm}
  with pytest.raises(ValueError, match="besides LoRA pairs.*model/norm/scale"):
    gguf_lora.write_gguf_lora(
      tmp_path / "b.gguf",
      qnn.unflatten(flat),
      lm.plan,
      spec(lm.config, "causal_lm"),
      False,
      base,
    )
  with pytest.raises(ValueError, match="--dtype: 'q4_k'"):
    _write(lm, tmp_path / "c.gguf", base, "q4_k")
  assert not list(tmp_path.iterdir())  # nothing half-written


@pytest.fixture(scope="module")
def gguf_run(tmp_path_factory):
  """A causal-LM run over the tiny llama GGUF (nf4 + LoRA, blocks stacked
  by scan), 2 steps."""
  folder = tmp_path_factory.mktemp("gguf_lora_run")
  ckpt = write_gguf(folder / "tiny.gguf", hf_tensors("llama", False, seed=5))
  with (folder / "train.jsonl").open("w") as f:
    for i in range(16):
      f.write(json.dumps({"text": " ".join(TEXTS[i % 4 : i % 4 + 2])}) + "\n")
  config = tiny_config.get_config(str(folder))
  config.data.eval_path = config.data.train_path
  config.model.checkpoint = str(ckpt)
  config.model.task = "causal_lm"
  config.model.scan_layers = True
  config.data.max_length = 16
  config.train.steps = 2
  config.train.eval_every = 2
  config.opt.learning_rate = 3e-2  # adapters far from zero after 2 steps
  train.train_and_evaluate(config, str(folder / "run"))
  return folder / "run", ckpt


def test_run_export_cli(gguf_run, tmp_path):
  """`experiments.export --gguf_lora` writes the restored run's adapters;
  an existing file needs --overwrite; --merged is refused with it."""
  run, ckpt = gguf_run
  restored = restore.restore(run)
  alpha, pairs = gguf_lora.lora_pairs(
    restored.trainable, restored.lm.plan, restored.spec, True, ckpt
  )
  out = tmp_path / "lora.gguf"
  cmd = [sys.executable, "-m", "experiments.export", f"--workdir={run}"]
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  said = []
  for extra, code in (
    ([f"--gguf_lora={out}"], 0),
    ([f"--gguf_lora={out}", "--merged"], 1),
  ):
    proc = subprocess.run(
      [*cmd, *extra],
      cwd=tiny_config.ROOT.parent,
      env=env,
      capture_output=True,
      text=True,
    )
    assert proc.returncode == code, proc.stderr[-2000:]
    said.append(proc.stderr)
  assert "not with --merged" in said[1]
  back = _tensors(out)
  assert len(back) == 2 * len(pairs) > 0
  for name, pair in pairs.items():
    np.testing.assert_array_equal(back[name + ".lora_a"], pair.a)
    np.testing.assert_array_equal(back[name + ".lora_b"], pair.b)
  reader = gguf.GGUFReader(out)
  assert reader.fields["adapter.lora.alpha"].contents() == alpha
  with pytest.raises(ValueError, match="exists; pass --overwrite"):
    export.export_gguf_lora(run, out)
  export.export_gguf_lora(run, out, "float16", overwrite=True)
  assert {t.tensor_type for t in gguf.GGUFReader(out).tensors} == {Q.F16}
