"""Exports a training run: its adapters for PEFT, or its merged model.

python -m experiments.export --workdir RUN --out DIR \
    [--merged] [--dtype bfloat16|float32] [--requantize] [--step N]
python -m experiments.export --workdir RUN --gguf OUT.gguf \
    [--dtype float32|bfloat16|float16|q8_0] [--step N]
python -m experiments.export --workdir RUN --gguf_lora OUT.gguf \
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
existing file is replaced only with --overwrite. With --gguf_lora (a run
over a GGUF base): the adapters alone as a llama.cpp LoRA GGUF file, which
llama.cpp applies over the base file at load time (`llama-cli -m BASE.gguf
--lora OUT.gguf`); DoRA, trained norms or heads and PiSSA / LoftQ runs are
refused (export them with --gguf). The base is rebuilt from
RUN/config.json and the trainable tree restored from the latest checkpoint
(or --step).
"""

from absl import app, flags

from qlora_jax.engine import cli, export

_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory.")
_OUT = flags.DEFINE_string("out", None, "Folder to write.")
_GGUF = flags.DEFINE_string("gguf", None, "GGUF file to write (merged).")
_GGUF_LORA = flags.DEFINE_string(
  "gguf_lora", None, "llama.cpp LoRA GGUF file to write (adapters)."
)
_MERGED = flags.DEFINE_bool("merged", False, "Write the merged model.")
_DTYPE = flags.DEFINE_enum(
  "dtype",
  "float32",
  ["float32", "bfloat16", "float16", "q8_0"],
  "Tensors written (float16 and q8_0: --gguf and --gguf_lora only).",
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
  print(f"wrote {_GGUF.value or _GGUF_LORA.value or _OUT.value}")


def _export() -> None:
  given = [x is not None for x in (_OUT.value, _GGUF.value, _GGUF_LORA.value)]
  if sum(given) != 1:
    raise app.UsageError(
      "give one of --out DIR, --gguf FILE and --gguf_lora FILE"
    )
  if _GGUF_LORA.value is not None:
    if _MERGED.value or _REQUANTIZE.value:
      raise app.UsageError(
        "--gguf_lora writes the adapters alone: not with --merged or "
        "--requantize (see --gguf)"
      )
    export.export_gguf_lora(
      _WORKDIR.value,
      _GGUF_LORA.value,
      _DTYPE.value,
      _STEP.value,
      overwrite=_OVERWRITE.value,
    )
  elif _GGUF.value is not None:
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
    raise app.UsageError(
      f"--dtype {_DTYPE.value}: only with --gguf or --gguf_lora"
    )
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
