"""Which model class serves a config and a task."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from qlora_jax.models import hf_names
from qlora_jax.models.bert import BertForSequenceClassification, BertModel
from qlora_jax.models.config import BertConfig, Config, GPT2Config, LlamaConfig
from qlora_jax.models.gpt2 import GPT2LMHeadModel
from qlora_jax.models.layers import Options
from qlora_jax.models.llama import LlamaForCausalLM

MODEL_TASKS = ("causal_lm", "embedding", "classification")


@dataclasses.dataclass(frozen=True)
class ModelSpec:
  """A config, a task and what follows from them."""

  config: Config
  task: str
  num_labels: int | None = None

  def __post_init__(self):
    if self.task not in MODEL_TASKS:
      raise ValueError(
        f"unknown task {self.task!r}: expected one of {MODEL_TASKS}"
      )
    decoder = isinstance(self.config, (LlamaConfig, GPT2Config))
    if decoder != (self.task == "causal_lm"):
      allowed = ("causal_lm",) if decoder else ("embedding", "classification")
      raise ValueError(
        f"task {self.task!r} is not available for model_type "
        f"{self.config.model_type!r}: use one of {allowed}"
      )
    if self.task == "classification":
      if not isinstance(self.num_labels, int) or self.num_labels < 1:
        raise ValueError(
          f"task 'classification' needs num_labels >= 1, got {self.num_labels}"
        )

  def build(self, opts: Options) -> nn.Module:
    c = self.config
    if isinstance(c, LlamaConfig):
      return LlamaForCausalLM(c, opts)
    if isinstance(c, GPT2Config):
      return GPT2LMHeadModel(c, opts)
    if self.task == "classification":
      return BertForSequenceClassification(c, self.num_labels, opts)
    return BertModel(c, opts, pooling="mean", normalize=True)

  @property
  def layout(self) -> hf_names.Layout:
    return hf_names.layout(self.config, self.task)

  @property
  def heads(self) -> tuple[str, ...]:
    """Paths of output heads built as QLoRADense (left out of
    "all-linear")."""
    return self.layout.heads

  def dummy_inputs(self) -> tuple[jnp.ndarray]:
    return (jnp.ones((1, 1), jnp.int32),)

  def abstract_variables(self, opts: Options) -> dict:
    """Shapes and dtypes of every variable, without computing any."""
    model = self.build(opts)
    rngs = {"params": jax.random.key(0)}
    return jax.eval_shape(lambda: model.init(rngs, *self.dummy_inputs()))


def is_bert(config: Config) -> bool:
  return isinstance(config, BertConfig)
