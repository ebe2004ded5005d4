"""Where a model's variables live in the Hugging Face model of the same task.

Module paths mirror transformers' names (see `qlora_jax.models.hf_names`):
the linear layer `model/layers_0/self_attn/q_proj` is the module
`model.layers.0.self_attn.q_proj` of LlamaForCausalLM. With scan_layers one
path (`model/layers/self_attn/q_proj`) stands for one module per layer,
stacked on a leading axis. `Names` lists every variable of a model with its
HF tensor name, per layer, so adapters and merged weights are written per
layer and read back into stacked arrays.

The HF class is the one transformers uses for the task: LlamaForCausalLM /
GPT2LMHeadModel ("causal_lm"), BertModel ("embedding"),
BertForSequenceClassification ("classification": the encoder under `bert.`,
the head as `classifier`).
"""

import dataclasses

import ml_dtypes
import numpy as np

from qlora_jax import nn as qnn
from qlora_jax.models import BertConfig, ModelSpec, loading

# The float dtypes of tensors written to files, by name.
FILE_DTYPES = {
  "float32": np.float32,
  "bfloat16": ml_dtypes.bfloat16,
  "float16": np.float16,
}

Path = tuple[str, ...]
HEAD_LEAVES = {"kernel": "weight", "bias": "bias"}  # flax nn.Dense heads


@dataclasses.dataclass(frozen=True)
class Tensor:
  """One HF tensor of one of our variables.

  Attributes:
    name: the HF tensor name ("model.layers.0.self_attn.q_proj.weight").
    path: the variable's path in our variables, collection first.
    layer: its index on the stacked axis (scanned blocks), else None.
    shape: our shape for one layer.
    transposed: HF stores the transpose (GPT-2's Conv1D, flax kernels).
  """

  name: str
  path: Path
  layer: int | None
  shape: tuple[int, ...]
  transposed: bool

  @property
  def module(self) -> str:
    """The HF module owning the tensor."""
    return self.name.rsplit(".", 1)[0]

  @property
  def hf_shape(self) -> tuple[int, ...]:
    return self.shape[::-1] if self.transposed else self.shape


class Names:
  """Every frozen variable and new head of a model, by HF tensor name."""

  def __init__(self, spec: ModelSpec, scan_layers: bool):
    self.spec, self.scan_layers = spec, scan_layers
    self.layout = spec.layout
    self.tensors: dict[str, Tensor] = {}
    for name, t in loading.targets(spec, scan_layers).items():
      self.tensors[name] = Tensor(
        name,
        (qnn.BASE, *t.dest),
        t.layer,
        t.shape,
        self.layout.is_transposed(name),
      )
    self.num_layers = spec.config.num_layers
    self._by_path: dict[tuple[Path, int | None], Tensor] = {
      (t.path, t.layer): t for t in self.tensors.values()
    }

  def linear_modules(self) -> dict[str, Tensor]:
    """{HF module name: its weight} of every linear layer (per layer)."""
    return {
      t.module: t for t in self.tensors.values() if t.path[-1] == "weight"
    }

  def layers(self, path: Path) -> list[int | None]:
    """Layer indices of a variable: one per block if it is stacked."""
    if (path, None) in self._by_path:
      return [None]
    if (path, 0) in self._by_path:
      return list(range(self.num_layers))
    raise KeyError(f"variable {'/'.join(path)} is not a variable of the model")

  def tensor(self, path: Path, layer: int | None) -> Tensor:
    """The HF tensor of `path` (a "base" variable or a "params" head)."""
    found = self._by_path.get((path, layer))
    if found is not None:
      return found
    return head_tensor(path)

  def module_of(self, module_path: str, layer: int | None) -> str:
    """HF module name of a linear layer given by its (scanned) path."""
    weight = (qnn.BASE, *module_path.split("/"), "weight")
    return self.tensor(weight, layer).module

  def unused_linears(self) -> list[str]:
    """HF linear modules our model does not compute (BERT's pooler: the
    models pool by masked mean)."""
    if isinstance(self.spec.config, BertConfig):
      prefix = "bert." if self.spec.task == "classification" else ""
      return [f"{prefix}pooler.dense"]
    return []


def head_tensor(path: Path, shape: tuple[int, ...] = ()) -> Tensor:
  """A new trainable head ("params", flax nn.Dense) as an HF tensor."""
  collection, *modules, leaf = path
  if collection != qnn.PARAMS or leaf not in HEAD_LEAVES or not modules:
    raise KeyError(
      f"variable {'/'.join(path)} has no Hugging Face name: only LoRA "
      "adapters, frozen variables and nn.Dense heads (kernel, bias) do"
    )
  name = ".".join(modules) + "." + HEAD_LEAVES[leaf]
  return Tensor(name, path, None, shape, leaf == "kernel")
