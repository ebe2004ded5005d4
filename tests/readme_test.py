"""The README's model snippet runs as printed (on the tiny Llama)."""

import pathlib
import re

import numpy as np

ROOT = pathlib.Path(__file__).parent.parent
FIXTURE = "tests/data/hf/llama_gqa"


def _models_snippet() -> str:
  text = (ROOT / "README.md").read_text()
  section = text.split("## Models and checkpoints", 1)[1]
  return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_readme_loads_quantized_adds_adapters_and_differentiates():
  code = _models_snippet()
  assert FIXTURE in code
  scope: dict = {}
  exec(code.replace(FIXTURE, str(ROOT / FIXTURE)), scope)
  assert np.isfinite(float(scope["loss"]))
  grads = scope["grads"]["params"]["model"]["layers_0"]["self_attn"]["q_proj"]
  assert grads["lora_a"].shape == (64, 8)
  # B starts at zero, so only B's gradient is non-zero at the first step.
  assert np.abs(grads["lora_b"]).max() > 0
  assert np.abs(grads["lora_a"]).max() == 0
