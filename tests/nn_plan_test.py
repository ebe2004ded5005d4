"""Adapter / quantization targeting by regex, names and patterns."""

import pytest

from qlora_jax import nn as qnn

PATHS = [
  "model/layers_0/self_attn/q_proj",
  "model/layers_0/self_attn/v_proj",
  "model/layers_0/mlp/down_proj",
  "model/layers_1/self_attn/q_proj",
  "model/layers_1/self_attn/v_proj",
  "model/layers_1/mlp/down_proj",
  "lm_head",
]
NF4 = {"data_type": "nf4", "block_size": 64, "double_quant": True}


def test_all_linear_leaves_out_heads():
  plan = qnn.make_plan(PATHS, {"rank": 4}, NF4, heads=["lm_head"])
  assert plan.lora_paths() == PATHS[:-1]
  assert plan.quant_paths() == PATHS[:-1]
  assert plan.lookup("lm_head") == qnn.LayerSpec()


def test_names_regex_exclude_and_patterns():
  lora = {
    "targets": ["q_proj", "v_proj"],
    "exclude": "layers_1/self_attn/v",
    "rank": 4,
    "alpha": 8,
    "rank_pattern": {"layers_1": 2},
    "alpha_pattern": {"v_proj": 1},
  }
  plan = qnn.make_plan(PATHS, lora, None)
  specs = {p: s.lora for p, s in plan.layers}
  assert sorted(specs) == sorted([PATHS[0], PATHS[1], PATHS[3]])
  assert specs[PATHS[0]].rank == 4 and specs[PATHS[0]].alpha == 8
  assert specs[PATHS[1]].alpha == 1
  assert specs[PATHS[3]].rank == 2
  assert plan.quant_paths() == []


def test_quant_and_lora_targets_are_independent():
  plan = qnn.make_plan(
    PATHS, {"targets": "q_proj$"}, dict(NF4, targets="mlp", exclude="layers_1")
  )
  assert plan.lora_paths() == [PATHS[0], PATHS[3]]
  assert plan.quant_paths() == [PATHS[2]]
  assert plan.lookup(PATHS[2]).lora is None


def test_errors_name_what_is_wrong():
  with pytest.raises(ValueError, match="regex 'k_proj' matches no linear"):
    qnn.make_plan(PATHS, {"targets": "k_proj"}, None)
  with pytest.raises(ValueError, match=r"no linear layer named \['gate'\]"):
    qnn.make_plan(PATHS, {"targets": ["q_proj", "gate"]}, None)
  with pytest.raises(ValueError, match="unknown lora option"):
    qnn.make_plan(PATHS, {"rnak": 4}, None)
  with pytest.raises(ValueError, match="match no adapted layer"):
    qnn.make_plan(PATHS, {"rank_pattern": {"nothing": 2}}, None)
  with pytest.raises(ValueError, match="unknown data type 'nf7'"):
    qnn.make_plan(PATHS, None, {"data_type": "nf7"})
  with pytest.raises(ValueError, match="block_size"):
    qnn.make_plan(PATHS, None, {"data_type": "nf4", "block_size": 7})
  with pytest.raises(ValueError, match="invalid regex"):
    qnn.make_plan(PATHS, {"targets": "("}, None)


def test_plan_is_hashable_and_its_text_lists_every_match():
  plan = qnn.make_plan(PATHS, {"rank": 4}, NF4, heads=["lm_head"])
  hash(plan)
  lines = qnn.plan_lines(plan, len(PATHS))
  # One line per planned layer (the head is neither adapted nor quantized).
  assert len(lines) == len(PATHS)
  for line, p in zip(lines, PATHS[:-1], strict=False):
    assert line.startswith(f"layer {p}: lora r=4 alpha=16 init=kaiming, nf4")
  assert lines[-1] == "6 of 7 linear layers have adapters, 6 are quantized"
