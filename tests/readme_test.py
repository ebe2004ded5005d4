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


def test_ci_runs_the_readme_test_command():
  """The setup block's test command is the one CI runs, word for word."""
  setup = (ROOT / "README.md").read_text().split("## Setup", 1)[1]
  block = re.search(r"```bash\n(.*?)```", setup, re.S).group(1)
  readme = [
    line.split("#", 1)[0].strip()
    for line in block.splitlines()
    if "pytest" in line
  ]
  ci = [
    line.strip()
    for line in (ROOT / ".ci/run").read_text().splitlines()
    if "pytest" in line and not line.lstrip().startswith("#")
  ]
  assert readme == ci and len(ci) == 1, (readme, ci)
