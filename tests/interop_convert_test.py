"""experiments.convert (engine.export.convert_gguf): a GGUF file is checked
as training checks it, and its folder appears whole or not at all.

The GGUF files are the tiny random llama of tests/models_gguf_test (2
layers); a lying `llama.block_count` is written by that same writer.
"""

import json
import os
import signal
import subprocess
import sys

import pytest

from qlora_jax import models
from qlora_jax.engine import export, outputs
from qlora_jax.interop import gguf_convert
from tests import models_gguf_test, tiny_config
from tests.models_gguf_test import hf_tensors, write_gguf


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
  return write_gguf(path, hf_tensors("llama", tied=False))


@pytest.mark.parametrize("layers", [4, 1])
def test_a_lying_block_count_is_refused_as_training_refuses_it(
  tmp_path, monkeypatch, layers
):
  tensors = hf_tensors("llama", tied=False)  # 2 layers
  monkeypatch.setattr(models_gguf_test, "LAYERS", layers)
  path = write_gguf(tmp_path / "lying.gguf", tensors)
  with pytest.raises(models.CheckpointError) as training:
    models.from_pretrained(path)
  with pytest.raises(models.CheckpointError) as converting:
    export.convert_gguf(path, tmp_path / "hf")
  assert str(converting.value) == str(training.value)
  assert str(path) in str(converting.value)
  assert "'model.layers." in str(converting.value)  # the tensor
  assert sorted(p.name for p in tmp_path.iterdir()) == ["lying.gguf"]


def _interrupt(*args, **kwargs):
  raise KeyboardInterrupt


def test_a_killed_convert_leaves_nothing_and_the_previous_folder(
  tiny, tmp_path, monkeypatch
):
  out = tmp_path / "hf"
  real = gguf_convert.write_tokenizer
  monkeypatch.setattr(gguf_convert, "write_tokenizer", _interrupt)
  with pytest.raises(KeyboardInterrupt):  # the tokenizer comes last
    export.convert_gguf(tiny, out)
  assert not list(tmp_path.iterdir())
  monkeypatch.setattr(gguf_convert, "write_tokenizer", real)
  export.convert_gguf(tiny, out)
  before = {p.name: p.read_bytes() for p in out.iterdir()}
  with pytest.raises(outputs.OutputError, match="pass --overwrite"):
    export.convert_gguf(tiny, out)
  monkeypatch.setattr(gguf_convert, "write_tokenizer", _interrupt)
  with pytest.raises(KeyboardInterrupt):
    export.convert_gguf(tiny, out, "bfloat16", overwrite=True)
  assert {p.name: p.read_bytes() for p in out.iterdir()} == before
  assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]


def test_a_swallowed_ctrl_c_still_stops_the_convert(
  tiny, tmp_path, monkeypatch
):
  real = gguf_convert.write_tokenizer

  def swallowing(*args):
    try:
      os.kill(os.getpid(), signal.SIGINT)
    except KeyboardInterrupt:
      pass
    real(*args)

  monkeypatch.setattr(gguf_convert, "write_tokenizer", swallowing)
  with pytest.raises(KeyboardInterrupt):
    export.convert_gguf(tiny, tmp_path / "hf")
  assert not list(tmp_path.iterdir())


def test_convert_refuses_its_own_input(tiny):
  with pytest.raises(outputs.OutputError, match="the --gguf file"):
    export.convert_gguf(tiny, tiny.parent, overwrite=True)


def test_command_line_overwrite(tiny, tmp_path):
  out = tmp_path / "hf"
  export.convert_gguf(tiny, out)
  cmd = [sys.executable, "-m", "experiments.convert", f"--gguf={tiny}"]
  proc = subprocess.run(
    [*cmd, f"--out={out}", "--dtype=bfloat16", "--overwrite"],
    cwd=tiny_config.ROOT.parent,
    env=dict(os.environ, JAX_PLATFORMS="cpu"),
    capture_output=True,
    text=True,
  )
  assert proc.returncode == 0, proc.stderr[-2000:]
  config = json.loads((out / "config.json").read_text())
  assert config["torch_dtype"] == "bfloat16"
  assert (out / "tokenizer.json").is_file()
  mode = (out / "model.safetensors").stat().st_mode & 0o777
  assert mode == 0o666 & ~_umask()


def _umask() -> int:
  mask = os.umask(0)
  os.umask(mask)
  return mask
