"""Exports a training run: its adapters for PEFT, or its merged model.

python -m experiments.export --workdir RUN --out DIR \
    [--merged] [--dtype bfloat16|float32] [--requantize] [--step N]
python -m experiments.export --workdir RUN --gguf OUT.gguf \
    [--dtype float32|bfloat16|float16|q8_0] [--step N]

Without --merged: a PEFT LoRA adapter (adapter_config.json and
adapter_model.safetensors) over the run's base checkpoint. With --merged:
a Hugging Face folder with the adapters folded into the dequantized base
(transformers loads it); --requantize stores the merged quantized layers as
codes and scales that `qlora_jax.models.from_pretrained` reads back.
The output appears only when complete (a failed or interrupted export
leaves the previous one as it was); an existing --out is replaced, whole,
only with --overwrite; nothing is written into the run's workdir or over
the base checkpoint, and a second export to the same path fails at once.
With --gguf (a run over a GGUF base, such as the main
job's SmolLM2): the merged model as one GGUF file with the base's metadata,
tokenizer and chat template, matrices in --dtype (norms in float32), which
llama.cpp, transformers (gguf_file=) and `models.from_pretrained` load; an
existing file is replaced only with --overwrite. The base is rebuilt from
RUN/config.json and the trainable tree restored from the latest checkpoint
(or --step).
"""

from absl import app, flags

from qlora_jax.engine import cli, export

_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory.")
_OUT = flags.DEFINE_string("out", None, "Folder to write.")
_GGUF = flags.DEFINE_string("gguf", None, "GGUF file to write (merged).")
_MERGED = flags.DEFINE_bool("merged", False, "Write the merged model.")
_DTYPE = flags.DEFINE_enum(
  "dtype",
  "float32",
  ["float32", "bfloat16", "float16", "q8_0"],
  "Merged tensors (float16 and q8_0: --gguf only).",
)
_REQUANTIZE = flags.DEFINE_bool(
  "requantize", False, "Merged: quantize the merged layers again."
)
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (latest).")
_OVERWRITE = flags.DEFINE_bool(
  "overwrite", False, "Replace a previous export in --out."
)
flags.mark_flags_as_required(["workdir"])


def main(argv):
  del argv
  _export()
  print(f"wrote {_GGUF.value or _OUT.value}")


def _export() -> None:
  if (_OUT.value is None) == (_GGUF.value is None):
    raise app.UsageError("give one of --out DIR and --gguf FILE")
  if _GGUF.value is not None:
    if _REQUANTIZE.value:
      raise app.UsageError("--requantize: not with --gguf (see --dtype)")
    export.export_gguf(
      _WORKDIR.value,
      _GGUF.value,
      _DTYPE.value,
      _STEP.value,
      overwrite=_OVERWRITE.value,
    )
  elif _DTYPE.value not in ("float32", "bfloat16"):
    raise app.UsageError(f"--dtype {_DTYPE.value}: only with --gguf")
  elif _MERGED.value:
    export.export_merged(
      _WORKDIR.value,
      _OUT.value,
      _DTYPE.value,
      _REQUANTIZE.value,
      _STEP.value,
      overwrite=_OVERWRITE.value,
    )
  else:
    if _REQUANTIZE.value:
      raise app.UsageError("--requantize needs --merged")
    export.export_adapter(
      _WORKDIR.value, _OUT.value, _STEP.value, overwrite=_OVERWRITE.value
    )


if __name__ == "__main__":
  cli.run(main)
