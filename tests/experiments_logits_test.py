"""`python -m experiments.logits` writes what the library computes."""

import pathlib
import subprocess
import sys

import numpy as np
import pytest

from qlora_jax import models

ROOT = pathlib.Path(__file__).parent.parent
HF = ROOT / "tests" / "data" / "hf"


def test_script_writes_the_library_outputs(tmp_path):
  ref = np.load(HF / "llama_gqa" / "reference.npz")
  np.save(tmp_path / "ids.npy", ref["input_ids"])
  cmd = [sys.executable, "-m", "experiments.logits"]
  cmd += ["--checkpoint", str(HF / "llama_gqa")]
  cmd += ["--input_ids", str(tmp_path / "ids.npy")]
  cmd += ["--out", str(tmp_path / "out.npy"), "--quant", "nf4"]
  cmd += ["--block_size", "32", "--double_quant"]
  subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True)
  out = np.load(tmp_path / "out.npy")
  want = models.checkpoint_outputs(
    HF / "llama_gqa",
    ref["input_ids"],
    quant="nf4",
    block_size=32,
    double_quant=True,
  )
  assert out.dtype == np.float32 and out.shape == (2, 10, 96)
  np.testing.assert_array_equal(out, want)
  # Quantization was on: the outputs moved away from the float32 logits.
  err = np.abs(out - ref["logits"]).max() / np.abs(ref["logits"]).max()
  assert err > 1e-3


def test_defaults_give_float32_reference_outputs():
  ref = np.load(HF / "gpt2" / "reference.npz")
  out = models.checkpoint_outputs(HF / "gpt2", ref["input_ids"])
  err = np.abs(out - ref["logits"]).max() / np.abs(ref["logits"]).max()
  assert err <= 1e-4


def test_bert_outputs_are_the_last_hidden_state_with_0_as_padding():
  ref = np.load(HF / "bert" / "reference.npz")
  ids = ref["input_ids"].copy()
  out = models.checkpoint_outputs(HF / "bert", ids)
  assert out.shape == (2, 10, 64)
  # The reference row 0 has token types 1 after position 5; row 1 is all 0
  # with three padding ids at the end.
  real = ref["attention_mask"][1] > 0
  want = ref["last_hidden_state"][1][real]
  err = np.abs(out[1][real] - want).max() / np.abs(want).max()
  assert err <= 1e-4


def test_bad_token_ids_raise():
  with pytest.raises(ValueError, match=r"\[0, 96\)"):
    models.checkpoint_outputs(HF / "gpt2", np.array([[1, 96]]))
  with pytest.raises(ValueError, match="shape"):
    models.checkpoint_outputs(HF / "gpt2", np.array([1, 2]))
