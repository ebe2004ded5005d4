"""The training benchmark's measurement on a tiny Llama (its figures are
checked for consistency, not speed: speed lives in experiments/)."""

import json
import math

import pytest

from qlora_jax import benchmark

H, LAYERS, HEADS, MLP, VOCAB = 32, 2, 4, 48, 64


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
  folder = tmp_path_factory.mktemp("llama")
  benchmark.write_random_llama(
    folder, benchmark.llama_config(H, LAYERS, HEADS, MLP, VOCAB)
  )
  return folder


@pytest.mark.parametrize("mode", ["qlora_nf4_dq", "full"])
def test_throughput_figures(checkpoint, mode):
  rank, batch, seq = 4, 2, 8
  r = benchmark.train_throughput(
    mode, checkpoint, batch=batch, seq=seq, rank=rank, steps_timed=2, warmup=1
  )
  json.dumps(r)  # one JSON-able record per run
  # Parameters by formula: q, k, v, o [H, H], gate/up [H -> MLP], down
  # [MLP -> H] per layer; embeddings and the untied head [VOCAB, H]; norms.
  linear = LAYERS * (4 * H * H + 3 * H * MLP)
  total = linear + 2 * VOCAB * H + (2 * LAYERS + 1) * H
  lora = LAYERS * rank * (4 * 2 * H + 3 * (H + MLP))
  if mode == "full":
    assert r["trainable_params"] == total
    assert r["total_params"] == total
  else:
    assert r["trainable_params"] == lora
  assert r["tokens_per_s"] == pytest.approx(batch * seq / r["step_s"])
  assert r["peak_rss_bytes"] > 0 and r["train_step_memory_bytes"] > 0
  # Random tokens over 64 ids: the first loss is near ln(64).
  assert abs(r["first_loss"] - math.log(VOCAB)) < 0.5
  assert math.isfinite(r["last_loss"])
