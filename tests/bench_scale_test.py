"""bench_scale's machinery on a tiny shape: sharded checkpoints written
tensor by tensor, loaded and trained from disk, and bad shards named."""

import json

import numpy as np
import pytest

from qlora_jax import models
from qlora_jax.bench import scale
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


def test_shards_hold_every_tensor_as_generated(folder):
  index = json.loads((folder / scale.INDEX).read_text())
  names = [n for n, _ in scale.tensor_shapes(TINY)]
  assert sorted(index["weight_map"]) == sorted(names)
  shards = sorted(folder.glob("*.safetensors"))
  assert len(shards) > 3  # 40 kB shards: the tiny model needs several
  assert not list(folder.parent.glob("*.partial"))
  ckpt = Checkpoint(folder)
  total = 0
  for name, shape in scale.tensor_shapes(TINY):
    got = ckpt.read(name)
    want = scale.random_tensor(name, shape, 0, "bfloat16")
    assert got.dtype.name == "bfloat16" and got.shape == shape
    np.testing.assert_array_equal(got.view(np.uint16), want.view(np.uint16))
    total += got.size * 2
  assert index["metadata"]["total_size"] == total
  # Each shard stays under the limit unless one tensor alone exceeds it.
  for path in shards:
    with open(path, "rb") as f:
      header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
    sizes = [
      v["data_offsets"][1] - v["data_offsets"][0]
      for k, v in header.items()
      if k != "__metadata__"
    ]
    assert sum(sizes) <= 40_000 or len(sizes) == 1
  # Matrices N(0, 0.02), norms ones.
  w = ckpt.read("model.layers.0.mlp.up_proj.weight").astype(np.float32)
  assert abs(w.std() - 0.02) < 0.002
  assert (ckpt.read("model.norm.weight") == 1).all()


def test_trains_from_disk_with_phase_peaks(folder):
  r = scale.train_from_disk(folder, "qlora_nf4_dq", batch=1, seq=32, rank=4)
  assert r["finite"] and len(r["losses"]) == 3
  # Random tokens over 300 ids: the first loss is about log(300).
  assert abs(r["losses"][0] - np.log(300)) < 0.5
  assert r["load_peak_rss_bytes"] >= r["runtime_rss_bytes"] > 0
  assert r["train_peak_rss_bytes"] > 0 and r["step_s"] > 0
  assert r["trainable_params"] == 3 * 4 * sum(
    a + b
    for a, b in [
      (64, 64),
      (64, 32),
      (64, 32),
      (64, 64),
      (64, 128),
      (64, 128),
      (128, 64),
    ]
  )
  # The same checkpoint generated as it is read (no files): the same
  # weights and batches, so bit-identical losses.
  g = scale.train_from_disk(
    scale.GeneratedLlama(TINY), "qlora_nf4_dq", batch=1, seq=32, rank=4
  )
  assert g["losses"] == r["losses"]


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
  def run(impl, load, peak, tok):
    return {
      "shape": "7b",
      "impl": impl,
      "mode": "qlora_nf4_dq",
      "load_s": load,
      "load_peak_rss_bytes": peak,
      "train_peak_rss_bytes": 2 * peak,
      "tokens_per_s": tok,
      "step_s": 256 / tok,
      "finite": True,
      "predicted_rss_bytes": 2 * peak,
      "predicted_step_bytes": peak,
      "runtime_rss_bytes": peak // 2,
      "losses": [1.0],
    }

  runs = [
    run("qlora_jax", 30.0, 4 * 2**30, 3.0),
    run("peft_bnb", 120.0, 16 * 2**30, 2.0),
    {
      "shape": "13b",
      "impl": "qlora_jax",
      "mode": "lora_bf16",
      "skipped": "does not fit",
      "predicted_rss_bytes": 30 * 2**30,
    },
  ]
  s = scale.summary(runs)
  assert s["7b_qlora_nf4_dq_load_time_ratio"] == 0.25
  assert s["7b_qlora_nf4_dq_load_peak_ratio"] == 0.25
  assert s["7b_qlora_nf4_dq_tokens_per_s_ratio"] == 1.5
  # peak 8 GiB over (step 4 GiB + runtime 2 GiB)
  assert s["7b_qlora_jax_qlora_nf4_dq_peak_over_predicted"] == round(8 / 6, 3)
  assert s["13b_qlora_jax_lora_bf16_skipped_predicted_gib"] == 30.0
  scale.plot_growth(runs, tmp_path / "g.png")
  assert (tmp_path / "g.png").stat().st_size > 10_000


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
