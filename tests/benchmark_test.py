"""The training benchmark's measurement on a tiny Llama (its figures are
checked for consistency, not speed: speed lives in experiments/)."""

import json
import math

import pytest

from qlora_jax.bench import train as benchmark

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


def test_layer_stack_bench_runs_the_engine_step_for_every_mode():
  from qlora_jax.bench import layers  # noqa: PLC0415
  from qlora_jax.engine.recipes import RECIPES as MODES  # noqa: PLC0415

  dim, n, rank = 128, 2, 4
  out = {
    m: layers.run_variant(
      m, 2, 8, layers=n, dim=dim, rank=rank, scan=True, repeats=1
    )
    for m in MODES
  }
  assert all(r["finite"] for r in out.values())
  # Trainable parameters by formula: A [dim, r] and B [r, dim] per layer;
  # full fine-tuning trains the embedding, every layer and the head.
  for m in ("lora_f32", "lora_bf16", "qlora_nf4_dq"):
    assert out[m]["trainable"] == n * 2 * dim * rank
  full = layers.VOCAB * dim + n * dim * dim + dim * layers.LABELS
  assert out["full"]["trainable"] == full
  # The frozen 4-bit base is the smallest program: codes are 1/8 of f32.
  assert out["qlora_nf4_dq"]["memory_mib"] < out["lora_f32"]["memory_mib"]


@pytest.mark.parametrize("quantized", [False, True])
def test_decode_profile_times_every_linear_layer_and_no_embedding(
  checkpoint, quantized
):
  # The profile's matmul part must run the same weights the decoding step
  # does: the 7 projections of each layer (shapes from the config), as
  # QuantizedTensors when quantized, never the embedding table.
  from qlora_jax import models, quant  # noqa: PLC0415
  from qlora_jax.bench import generate  # noqa: PLC0415

  lm = models.from_pretrained(
    checkpoint, quant=generate.NF4_DQ if quantized else None
  )
  got = sorted(w.shape for w in generate._linear_weights(lm.variables))
  want = sorted(
    [(HEADS * 8, H)] * 4 * LAYERS  # q, k, v (4 heads of 8), o: H x H
    + [(MLP, H)] * 2 * LAYERS  # gate, up
    + [(H, MLP)] * LAYERS  # down
  )
  assert got == want
  kinds = {
    isinstance(w, quant.QuantizedTensor)
    for w in generate._linear_weights(lm.variables)
  }
  assert kinds == {quantized}
