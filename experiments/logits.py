"""Writes a checkpoint's float32 outputs for a batch of token ids.

python -m experiments.logits --checkpoint DIR --input_ids IDS.npy \
    --out OUT.npy [--quant none|nf4|fp4|int4|nf3|...] [--block_size 64] \
    [--double_quant]

IDS.npy holds integers [batch, seq]. Decoders (Llama, Mistral, Qwen2,
GPT-2) write logits [batch, seq, vocab]; BERT writes the last hidden state
[batch, seq, hidden] with id 0 as padding. Float32 compute; no
quantization unless --quant names a data type.
"""

import numpy as np
from absl import flags

from qlora_jax.engine import cli
from qlora_jax.models import checkpoint_outputs

_CHECKPOINT = flags.DEFINE_string(
  "checkpoint", None, "Hugging Face checkpoint folder."
)
_INPUT_IDS = flags.DEFINE_string("input_ids", None, ".npy of token ids.")
_OUT = flags.DEFINE_string("out", None, ".npy file to write.")
_QUANT = flags.DEFINE_string(
  "quant", "none", "Data type of the linear weights, or none."
)
_BLOCK_SIZE = flags.DEFINE_integer("block_size", 64, "Quantization block.")
_DOUBLE_QUANT = flags.DEFINE_bool(
  "double_quant", False, "Quantize the block scales too."
)
flags.mark_flags_as_required(["checkpoint", "input_ids", "out"])


def main(argv):
  del argv
  outputs = checkpoint_outputs(
    _CHECKPOINT.value,
    np.load(_INPUT_IDS.value),
    quant=_QUANT.value,
    block_size=_BLOCK_SIZE.value,
    double_quant=_DOUBLE_QUANT.value,
  )
  np.save(_OUT.value, outputs)
  print(f"wrote {outputs.dtype} {outputs.shape} to {_OUT.value}")


if __name__ == "__main__":
  cli.run(main)
