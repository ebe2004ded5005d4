"""The `lm_eval.api.model.LM` over a `lm.TextModel`: the only module that
imports lm_eval (import it through `harness.evaluate`, which says what to
install when lm-eval is missing). Every request is answered by the
TextModel, with lm-eval's Hugging Face backend's semantics (`harness.lm`).
"""

from lm_eval.api.model import LM

from qlora_jax.harness.lm import TextModel


class JaxLM(LM):
  """lm-eval's view of a `TextModel`."""

  def __init__(self, text_model: TextModel):
    super().__init__()
    self.text_model = text_model

  def loglikelihood(self, instances, disable_tqdm: bool = False):
    return self.text_model.loglikelihood([i.args[:2] for i in instances])

  def loglikelihood_rolling(self, instances, disable_tqdm: bool = False):
    return self.text_model.loglikelihood_rolling([i.args[0] for i in instances])

  def generate_until(self, instances, disable_tqdm: bool = False):
    return self.text_model.generate_until([i.args[:2] for i in instances])

  def apply_chat_template(
    self, chat_history: list[dict[str, str]], add_generation_prompt=True
  ) -> str:
    return self.text_model.apply_chat_template(
      chat_history, add_generation_prompt
    )

  @property
  def tokenizer_name(self) -> str:
    return self.text_model.name.replace("/", "__")

  def chat_template(self, chat_template: bool | str = False) -> str | None:
    if not chat_template:
      return None
    return self.text_model.tokenizer.chat_template
