"""How Hugging Face tensor names map onto the models' variables.

Module paths mirror transformers' module names, so a variable's checkpoint
name follows from its path: "/" becomes ".", a block `layers_3` becomes
`layers.3`, and the leaves `embedding` (embeddings) and `scale` (norms) are
called `weight`. Checkpoints of a bare trunk (LlamaModel, GPT2Model,
BertModel) and of a model with a head (LlamaForCausalLM, ...) both load:
the trunk prefix (`model.`, `transformer.`, `bert.`) is optional.
"""

import dataclasses
import re

from qlora_jax.models.config import BertConfig, Config, GPT2Config, LlamaConfig

_LEAF_NAMES = {"embedding": "weight", "scale": "weight"}


@dataclasses.dataclass(frozen=True)
class Layout:
  """A family's checkpoint naming.

  Attributes:
    hf_trunk: the trunk's prefix in checkpoints with a head ("model.").
    trunk: the trunk's module name in our model ("" when it is the root).
    blocks: the name of the block list ("layers", "h", "layer").
    heads: HF names of modules outside the trunk that the model loads.
    transposed: regex of HF names stored [in, out] (GPT-2's Conv1D).
    ignored: regexes of HF names the model does not use (buffers, heads of
      other tasks, a tied output head); anything else unknown is an error.
  """

  hf_trunk: str
  trunk: str
  blocks: str
  heads: tuple[str, ...] = ()
  transposed: str | None = None
  ignored: tuple[str, ...] = ()

  def hf_name(self, path: tuple[str, ...]) -> str:
    """The HF tensor name of an (unscanned) "base" variable path."""
    *modules, leaf = path
    name = ".".join(modules)
    name = re.sub(
      rf"(^|\.){self.blocks}_(\d+)(?=\.|$)", rf"\1{self.blocks}.\2", name
    )
    return f"{name}.{_LEAF_NAMES.get(leaf, leaf)}"

  def canonical(self, key: str) -> str:
    """A checkpoint tensor name in the model's naming (trunk prefix fixed)."""
    for head in self.heads:
      if key.startswith(head + "."):
        return key
    body = key.removeprefix(self.hf_trunk)
    return f"{self.trunk}.{body}" if self.trunk else body

  def is_ignored(self, key: str) -> bool:
    return any(re.search(p, key) for p in self.ignored)

  def is_transposed(self, name: str) -> bool:
    return self.transposed is not None and bool(
      re.search(self.transposed, name)
    )


def layout(config: Config, task: str) -> Layout:
  """The checkpoint naming of `config`'s family for `task`."""
  if isinstance(config, LlamaConfig):
    tied = config.tie_word_embeddings
    return Layout(
      hf_trunk="model.",
      trunk="model",
      blocks="layers",
      heads=() if tied else ("lm_head",),
      ignored=(r"\.rotary_emb\.inv_freq$",)
      + ((r"^lm_head\.",) if tied else ()),
    )
  if isinstance(config, GPT2Config):
    tied = config.tie_word_embeddings
    return Layout(
      hf_trunk="transformer.",
      trunk="transformer",
      blocks="h",
      heads=() if tied else ("lm_head",),
      transposed=r"\.(c_attn|c_proj|c_fc)\.weight$",
      ignored=(r"\.attn\.(masked_)?bias$",)
      + ((r"^lm_head\.",) if tied else ()),
    )
  if isinstance(config, BertConfig):
    return Layout(
      hf_trunk="bert.",
      trunk="bert" if task == "classification" else "",
      blocks="layer",
      ignored=(
        r"(^|\.)embeddings\.position_ids$",
        r"^(bert\.)?pooler\.",
        r"^cls\.",
        r"^classifier\.",
      ),
    )
  raise ValueError(f"no checkpoint layout for {type(config).__name__}")
