"""Settings: every rule of a typed object is refused in the config's first
pass, with the config field's name, and the typed objects are built once.

Reference: the rules of `quant.QuantSpec`, `nn.LoraSpec`,
`nn.LoraTargets`, `nn.check_pair` and `optim.OptSettings` (each case below
breaks one, by hand); the expected field names are the config's own.
"""

import pytest

from configs import minilm_docstrings as default
from qlora_jax import nn as qnn
from qlora_jax import quant
from qlora_jax.engine import train
from qlora_jax.engine.settings import ConfigError, Settings


def _config(**dotted):
  c = default.get_config()
  for key, value in dotted.items():
    section, field = key.split("__")
    setattr(c[section], field, value)
  return c


# (overrides, the field named, a piece of its message)
CASES = [
  (dict(quant__block_size=63), "quant.block_size", "multiple of 2"),
  (dict(quant__block_size=8192), "quant.block_size", "up to 4096"),
  (dict(quant__data_type="nf7"), "quant.data_type", "unknown data type"),
  (
    dict(quant__data_type="int4_asym", quant__double_quant=True),
    "quant.double_quant",
    "float16 scale and minimum",
  ),
  (dict(lora__rank=0), "lora.rank", ">= 1"),
  (dict(lora__init="svd"), "lora.init", "unknown lora init"),
  (dict(lora__dropout=1.0), "lora.dropout", "[0, 1)"),
  (dict(lora__loftq_iters=0), "lora.loftq_iters", ">= 1"),
  (dict(lora__qa=True, lora__dora=True), "lora.qa", "no dora"),
  (dict(lora__qa=True), "lora.qa", "int4_asym"),  # over nf4
  (dict(lora__rank_pattern={"q_proj": 0}), "lora.rank_pattern", ">= 1"),
  (dict(lora__alpha=0.0), "lora.alpha", "the adapter a no-op"),
  (dict(lora__alpha=float("nan")), "lora.alpha", "must be finite"),
  (dict(lora__alpha_pattern={"q_proj": 0}), "lora.alpha_pattern", "no-op"),
  (dict(opt__learning_rate=0.0), "opt.learning_rate", "> 0"),
  (dict(opt__schedule="step"), "opt.schedule", "unknown value 'step'"),
  (dict(opt__b2=1.0), "opt.b2", "[0, 1)"),
  (dict(opt__max_grad_norm=-1.0), "opt.max_grad_norm", ">= 0"),
  (dict(opt__lora_plus_ratio=0.0), "opt.lora_plus_ratio", "> 0"),
  (dict(eval__backend="hf"), "eval.backend", "unknown value 'hf'"),
  (dict(eval__limit=-1), "eval.limit", ">= 0"),
  (dict(eval__num_fewshot=-1), "eval.num_fewshot", ">= 0"),
  (dict(eval__batch_size=-1), "eval.batch_size", ">= 0"),
  (dict(eval__tasks=("",)), "eval.tasks", "a list of task names"),
  (dict(eval__tasks=("mmlu",)), "eval.tasks", "need model.task 'causal_lm'"),
]


@pytest.mark.parametrize(
  "overrides,field,message", CASES, ids=[c[1] for c in CASES]
)
def test_each_spec_rule_is_refused_in_the_first_pass(overrides, field, message):
  with pytest.raises(ConfigError) as e:
    Settings.from_config(_config(**overrides))
  lines = str(e.value).splitlines()[1:]
  named = [line.strip() for line in lines if line.strip().startswith(field)]
  assert len(named) == 1, (field, lines)
  assert named[0].startswith(f"{field}: ") and message in named[0], named


def test_errors_of_several_owners_come_together():
  c = _config(quant__block_size=63, lora__rank=0, opt__eps=0.0)
  with pytest.raises(ConfigError) as e:
    Settings.from_config(c)
  text = str(e.value)
  for field in ("quant.block_size:", "lora.rank:", "opt.eps:"):
    assert field in text, text


def test_block_size_63_stops_the_run_before_its_workdir_exists(tmp_path):
  workdir = tmp_path / "run"
  with pytest.raises(ConfigError, match="quant.block_size: must be"):
    train.train_and_evaluate(_config(quant__block_size=63), str(workdir))
  assert not workdir.exists()


def test_typed_objects_are_built_once_from_the_sections():
  s = Settings.from_config(_config(lora__rank=4, quant__block_size=32))
  assert s.lora_plan() == qnn.LoraTargets(
    qnn.LoraSpec(rank=4, alpha=16.0, dropout=s.lora.dropout),
    targets="all-linear",
    exclude="",
  )
  assert s.quant_plan().spec == quant.QuantSpec("nf4", 32, True)
  # The one reader of "none": a float base has no quantization.
  assert (
    Settings.from_config(_config(quant__data_type="none")).quant_plan() is None
  )
  # No adapters when LoRA is off; a full fine-tune has neither.
  assert Settings.from_config(_config(lora__enabled=False)).lora_plan() is None
  full = Settings.from_config(
    _config(train__mode="full", quant__data_type="none", lora__enabled=False)
  )
  assert full.lora_plan() is None and full.quant_plan() is None
  with pytest.raises(ConfigError, match="quant.data_type: train.mode 'full'"):
    Settings.from_config(_config(train__mode="full"))


def test_every_committed_config_passes_the_first_pass():
  # Each configs/*.py training run (the schema and the sweeps' base
  # configs included) gives valid settings as committed: a typo in a config's
  # fields or values fails here, not minutes into its run.
  import importlib  # noqa: PLC0415
  import pathlib  # noqa: PLC0415

  root = pathlib.Path(__file__).resolve().parent.parent / "configs"
  names = sorted(p.stem for p in root.glob("*.py") if p.stem != "__init__")
  assert {"base", "default", "gemma3_chat", "table10_rl"} <= set(names)
  for name in names:
    module = importlib.import_module(f"configs.{name}")
    config = module.get_config()
    if "model" not in config:  # tables 1 and 6 measure, they train nothing
      assert name in ("table1_dtypes", "table6_perplexity"), name
      continue
    if name == "base":  # the schema names no model or data: refused so
      with pytest.raises(ConfigError, match="model.checkpoint"):
        Settings.from_config(config)
      continue
    s = Settings.from_config(config)
    assert s.model.checkpoint or s.model.hf_config, name
