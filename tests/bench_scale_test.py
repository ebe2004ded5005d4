"""bench_scale's machinery on a tiny shape: sharded checkpoints written
tensor by tensor, loaded and trained from disk, and bad shards named."""

import json
import statistics

import numpy as np
import pytest

from qlora_jax import models
from qlora_jax.bench import scale, scale_sweep
from qlora_jax.models.safetensors_reader import Checkpoint, CheckpointError

TINY = {
  "model_type": "llama",
  "vocab_size": 300,
  "hidden_size": 64,
  "intermediate_size": 128,
  "num_hidden_layers": 3,
  "num_attention_heads": 4,
  "num_key_value_heads": 2,
  "max_position_embeddings": 512,
  "tie_word_embeddings": False,
}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
  root = tmp_path_factory.mktemp("scale")
  return scale.write_sharded_llama(root / "tiny", TINY, shard_bytes=40_000)


# TINY's parameters by hand: embeddings and untied head (300 x 64 each),
# the final norm (64), and per layer q and o (64 x 64), k and v (64 x 32:
# 2 heads of 16), gate, up and down (64 x 128) and two norms (64).
TINY_LAYER = 2 * 64 * 64 + 2 * 64 * 32 + 3 * 64 * 128 + 2 * 64  # 36,992
TINY_PARAMS = 2 * 300 * 64 + 64 + 3 * TINY_LAYER  # 149,440


def test_shards_hold_every_tensor_as_generated(folder):
  """Every tensor reads back bit for bit as `random_tensor` makes it; the
  index's total is TINY's parameters x 2 bytes (bfloat16) and the shards'
  files their 8-byte length, header and data, nothing else (exact). The
  shards are filled in order, a tensor opening a new one when it would take
  the current one past 40,000 bytes: their data bytes, worked out by hand
  below, are exact."""
  index = json.loads((folder / scale.INDEX).read_text())
  names = [n for n, _ in scale.tensor_shapes(TINY)]
  assert sorted(index["weight_map"]) == sorted(names)
  assert not list(folder.parent.glob("*.partial"))
  ckpt = Checkpoint(folder)
  for name, shape in scale.tensor_shapes(TINY):
    got = ckpt.read(name)
    want = scale.random_tensor(name, shape, 0, "bfloat16")
    assert got.dtype.name == "bfloat16" and got.shape == shape
    np.testing.assert_array_equal(got.view(np.uint16), want.view(np.uint16))
  assert index["metadata"]["total_size"] == 2 * TINY_PARAMS == 298_880
  # Bytes of a layer's tensors: q 8192, k 4096, v 4096, o 8192, gate, up,
  # down 16384 each, two norms 128 each; embeddings and head 38400, final
  # norm 128. Filled in order under 40,000 bytes:
  want_shards = [
    38400,  # embeddings (+ q of layer 0 would be 46,592)
    8192 + 4096 + 4096 + 8192,  # layer 0 q k v o (+ gate: 40,960)
    2 * 16384,  # gate, up (+ down: 49,152)
    16384 + 2 * 128 + 8192 + 4096 + 4096,  # down, norms; layer 1 q k v
    8192 + 16384,  # o, gate (+ up: 40,960)
    2 * 16384 + 2 * 128,  # up, down, norms (+ layer 2 q: 41,216)
    8192 + 4096 + 4096 + 8192,  # layer 2 q k v o
    2 * 16384,  # gate, up
    16384 + 2 * 128 + 128,  # down, norms, final norm (+ head: 55,168)
    38400,  # head
  ]
  assert sum(want_shards) == 2 * TINY_PARAMS
  shards = sorted(folder.glob("*.safetensors"))
  assert [p.name for p in shards] == [
    f"model-{i:05d}-of-00010.safetensors" for i in range(1, 11)
  ]
  got_shards, file_bytes = [], 0
  for path in shards:
    with open(path, "rb") as f:
      length = int.from_bytes(f.read(8), "little")
      header = json.loads(f.read(length))
    header.pop("__metadata__")
    got_shards.append(
      sum(v["data_offsets"][1] - v["data_offsets"][0] for v in header.values())
    )
    file_bytes += 8 + length + got_shards[-1]
    assert path.stat().st_size == 8 + length + got_shards[-1], path.name
  assert got_shards == want_shards
  assert scale.checkpoint_bytes(folder) == file_bytes
  # Matrices N(0, 0.02), norms ones.
  w = ckpt.read("model.layers.0.mlp.up_proj.weight").astype(np.float32)
  assert abs(w.std() - 0.02) < 0.002
  assert (ckpt.read("model.norm.weight") == 1).all()


def test_trains_from_disk_with_phase_peaks(folder, monkeypatch):
  """Three steps from disk. Exact: the trainable count (rank 4 x (in + out)
  of the 7 linear layers of each of 3 layers), all parameters (those plus
  TINY_PARAMS: a quantized tensor counts its elements), step_s the median
  of the steps after the first (1e-12 relative: the median's mean of two)
  and tokens/s 32 tokens over it. The first loss: about log(300) (random
  tokens; 0.5). Each phase's peak is read from its own window: on a clock
  of scripted readings, the load's window opens after the resident size is
  read, holds the load and closes before the train window opens."""
  r = scale.train_from_disk(folder, "qlora_nf4_dq", batch=1, seq=32, rank=4)
  assert r["finite"] and len(r["losses"]) == 3
  assert abs(r["losses"][0] - np.log(300)) < 0.5
  trainable = (
    3
    * 4
    * sum(
      a + b
      for a, b in [
        (64, 64),  # q
        (64, 32),  # k
        (64, 32),  # v
        (64, 64),  # o
        (64, 128),  # gate
        (64, 128),  # up
        (128, 64),  # down
      ]
    )
  )
  assert r["trainable_params"] == trainable
  assert r["params"] == trainable + TINY_PARAMS
  assert len(r["step_times_s"]) == 3
  assert r["step_s"] == pytest.approx(
    statistics.median(r["step_times_s"][1:]), rel=1e-12
  )
  assert r["tokens_per_s"] == 32 / r["step_s"]
  # A window's peak is at least the resident size it opened at.
  assert r["load_peak_rss_bytes"] >= r["runtime_rss_bytes"] > 0
  # The same checkpoint generated as it is read (no files): the same
  # weights and batches, so bit-identical losses; its memory readings
  # scripted (bytes) to see which lands where.
  events, peaks = [], iter([300, 200])

  def record(name, then=lambda *a, **k: None):
    def fn(*a, **k):
      events.append(name)
      return then(*a, **k)

    return fn

  real_load = models.from_checkpoint
  monkeypatch.setattr(models, "from_checkpoint", record("load", real_load))
  monkeypatch.setattr(
    scale.profiling, "current_rss_bytes", record("rss", lambda: 100)
  )
  monkeypatch.setattr(scale.profiling, "reset_peak_rss", record("reset"))
  monkeypatch.setattr(
    scale.profiling,
    "window_peak_rss_bytes",
    record("peak", lambda: next(peaks)),
  )
  g = scale.train_from_disk(
    scale.GeneratedLlama(TINY), "qlora_nf4_dq", batch=1, seq=32, rank=4
  )
  assert g["losses"] == r["losses"]
  assert events == ["rss", "reset", "load", "peak", "reset", "peak"]
  assert g["runtime_rss_bytes"] == 100
  assert g["load_peak_rss_bytes"] == 300
  assert g["train_peak_rss_bytes"] == 200


def test_frozen_floats_in_bfloat16_train_as_in_float32(folder, monkeypatch):
  """bench_scale keeps the embeddings, norms and head of a QLoRA run in the
  checkpoints' bfloat16 (`frozen_dtypes`): the same values as float32
  copies of them, so the same losses (1e-6 relative: float32 sums) at
  fewer bytes."""
  assert scale.frozen_dtypes("qlora_nf4_dq") == ("bfloat16", "bfloat16")
  assert scale.frozen_dtypes("full") == ("float32", None)
  assert scale.frozen_dtypes("lora_f32") == ("float32", "bfloat16")
  narrow = scale.train_from_disk(
    folder, "qlora_nf4_dq", batch=1, seq=32, rank=4
  )
  monkeypatch.setattr(
    scale, "frozen_dtypes", lambda mode, rank=16: (np.dtype("float32"), None)
  )
  wide = scale.train_from_disk(folder, "qlora_nf4_dq", batch=1, seq=32, rank=4)
  np.testing.assert_allclose(narrow["losses"], wide["losses"], rtol=1e-6)


def test_missing_truncated_and_phantom_shards_are_named(folder, tmp_path):
  import shutil  # noqa: PLC0415

  broken = tmp_path / "broken"
  shutil.copytree(folder, broken)
  index = json.loads((broken / scale.INDEX).read_text())
  shard = index["weight_map"]["model.layers.1.mlp.down_proj.weight"]
  (broken / shard).unlink()
  with pytest.raises(CheckpointError, match=f"{shard}, which does not exist"):
    models.from_pretrained(broken, task="causal_lm")
  shutil.copy(folder / shard, broken / shard)
  data = (broken / shard).read_bytes()
  (broken / shard).write_bytes(data[: len(data) // 2])
  with pytest.raises(CheckpointError, match=shard):
    models.from_pretrained(broken, task="causal_lm")
  shutil.copy(folder / shard, broken / shard)
  index["weight_map"]["model.layers.9.mlp.up_proj.weight"] = shard
  (broken / scale.INDEX).write_text(json.dumps(index))
  with pytest.raises(CheckpointError, match="layers.9.mlp.up_proj.*does not"):
    models.from_pretrained(broken, task="causal_lm")


def test_summary_ratios_and_plot(tmp_path):
  """Every figure of `summary` equals its value worked out by hand from the
  runs below (exact, after the rounding `summary` applies: 3 places for
  GiB and ratios, 2 for tokens/s, 1 for seconds); the plot is a PNG of
  11 x 4.2 inches at 120 dpi, 1320 x 504 pixels."""
  gib = 2**30

  def run(shape, impl, load_s, load_peak, train_peak, tok, **more):
    return {
      "shape": shape,
      "impl": impl,
      "mode": "qlora_nf4_dq",
      "load_s": load_s,
      "load_peak_rss_bytes": load_peak * gib,
      "train_peak_rss_bytes": train_peak * gib,
      "tokens_per_s": tok,
      "step_s": 256 / tok,
      "finite": True,
      "losses": [1.0],
      **more,
    }

  runs = [
    run(
      "7b",
      "qlora_jax",
      30.0,
      4,
      6,
      3.0,
      predicted_rss_bytes=7 * gib,
      predicted_step_bytes=3 * gib,
      runtime_rss_bytes=2 * gib,
    ),
    run("7b", "peft_bnb", 120.0, 10, 30, 2.0),
    run("13b", "qlora_jax", 50.04, 6, 9, 1.5, predicted_rss_bytes=8 * gib),
    {
      "shape": "13b",
      "impl": "peft_bnb",
      "mode": "qlora_nf4_dq",
      "error": "killed",
    },
    {
      "shape": "13b",
      "impl": "qlora_jax",
      "mode": "lora_bf16",
      "skipped": "does not fit",
      "predicted_rss_bytes": 30 * gib,
    },
  ]
  ours7, peer7, ours13 = (
    "7b_qlora_jax_qlora_nf4_dq",
    "7b_peft_bnb_qlora_nf4_dq",
    "13b_qlora_jax_qlora_nf4_dq",
  )
  assert scale_sweep.summary(runs) == {
    f"{ours7}_train_peak_gib": 6.0,
    f"{ours7}_load_peak_gib": 4.0,
    f"{ours7}_load_s": 30.0,
    f"{ours7}_tokens_per_s": 3.0,
    f"{ours7}_finite": True,
    f"{ours7}_peak_over_predicted": 1.2,  # 6 GiB / (step 3 + runtime 2)
    f"{peer7}_train_peak_gib": 30.0,  # PEFT's: no prediction
    f"{peer7}_load_peak_gib": 10.0,
    f"{peer7}_load_s": 120.0,
    f"{peer7}_tokens_per_s": 2.0,
    f"{peer7}_finite": True,
    f"{ours13}_train_peak_gib": 9.0,
    f"{ours13}_load_peak_gib": 6.0,
    f"{ours13}_load_s": 50.0,  # 50.04 to 1 place
    f"{ours13}_tokens_per_s": 1.5,
    f"{ours13}_finite": True,
    f"{ours13}_peak_over_predicted": 1.125,  # no step figure: 9 / 8
    "13b_peft_bnb_qlora_nf4_dq_failed": True,
    "13b_qlora_jax_lora_bf16_skipped_predicted_gib": 30.0,
    "7b_qlora_nf4_dq_load_time_ratio": 0.25,  # 30 s / 120 s
    "7b_qlora_nf4_dq_load_peak_ratio": 0.4,  # 4 GiB / 10 GiB
    "7b_qlora_nf4_dq_train_peak_ratio": 0.2,  # 6 GiB / 30 GiB
    "7b_qlora_nf4_dq_tokens_per_s_ratio": 1.5,  # 3 / 2 tokens/s
  }
  scale_sweep.plot_growth(runs, tmp_path / "g.png")
  png = (tmp_path / "g.png").read_bytes()
  assert png[:8] == b"\x89PNG\r\n\x1a\n" and png[12:16] == b"IHDR"
  size = int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")
  assert size == (1320, 504)


@pytest.mark.parametrize("tied", [False, True])
def test_a_bfloat16_embedding_changes_no_logit(folder, tied):
  """The embedding held in the checkpoint's bfloat16 (`embed_dtype`) is the
  checkpoint's bits, and the logits equal those of a float32 embedding
  exactly: the gather, and the tied head's matmul after an exact upcast,
  see the same values."""
  import jax.numpy as jnp  # noqa: PLC0415

  quant = {"data_type": "nf4", "block_size": 64, "double_quant": True}
  if tied:
    config = {**TINY, "tie_word_embeddings": True}
    src = scale.GeneratedLlama(config)

    def load(**kw):
      return models.from_checkpoint(src, config, quant=quant, **kw)

    table = src.read("model.embed_tokens.weight")
  else:

    def load(**kw):
      return models.from_pretrained(folder, quant=quant, **kw)

    table = Checkpoint(folder).read("model.embed_tokens.weight")
  narrow, wide = load(embed_dtype=jnp.bfloat16), load()
  got = narrow.variables["base"]["model"]["embed_tokens"]["embedding"]
  assert got.dtype == jnp.bfloat16
  assert wide.variables["base"]["model"]["embed_tokens"]["embedding"].dtype == (
    jnp.float32
  )
  np.testing.assert_array_equal(
    np.asarray(got).view(np.uint16), table.view(np.uint16)
  )
  ids = jnp.asarray(np.random.default_rng(0).integers(0, 300, (2, 16)))
  np.testing.assert_array_equal(
    np.asarray(narrow.model.apply(narrow.variables, ids)),
    np.asarray(wide.model.apply(wide.variables, ids)),
  )
