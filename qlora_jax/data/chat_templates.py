"""Chat templates for base models (`data.chat_template`).

A base checkpoint has no chat template, though its vocabulary may hold
its family's turn tokens. A run names one of `BUILT_IN`, written as the
instruction-tuned models of each family ship them:

- "chatml": `<|im_start|>role\\n...<|im_end|>\\n`, as SmolLM-Instruct and
  TRL's `setup_chat_format` write it (no default system prompt);
- "gemma": google/gemma-3-*-it's template (a system message is prefixed
  to the first user turn; the assistant's role is "model"; roles must
  alternate; text is trimmed);
- "llama3": Meta-Llama-3-8B-Instruct's template (`<|begin_of_text|>`, then
  `<|start_header_id|>role<|end_header_id|>\\n\\n...<|eot_id|>`);

or a Jinja file. `resolve` gives the tokenizer that renders with it; the
tokens a built-in template writes must each be one token of the
vocabulary. The end-of-turn token a template writes after the assistant's
text (`Tokenizer.end_of_turn_id`) ends generation.
"""

import dataclasses
import pathlib

from qlora_jax.data.tokenizer import Tokenizer

# data.chat_template's values besides a built-in name and a file path:
# the checkpoint's own template, or none (prompt and completion joined).
OWN = ""
NONE = "none"


@dataclasses.dataclass(frozen=True)
class BuiltIn:
  """A family's template and the special tokens its text writes."""

  text: str
  tokens: tuple[str, ...]
  uses_bos: bool  # renders `bos_token`, so the tokenizer needs one


_CHATML = (
  "{% for message in messages %}"
  "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
  "'<|im_end|>' + '\n'}}"
  "{% endfor %}"
  "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_GEMMA = """{{ bos_token }}
{%- if messages[0]['role'] == 'system' -%}
    {%- if messages[0]['content'] is string -%}
        {%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}
    {%- else -%}
        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '\n\n' -%}
    {%- endif -%}
    {%- set loop_messages = messages[1:] -%}
{%- else -%}
    {%- set first_user_prefix = "" -%}
    {%- set loop_messages = messages -%}
{%- endif -%}
{%- for message in loop_messages -%}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}
        {{ raise_exception("Conversation roles must alternate user/assistant/user/assistant/...") }}
    {%- endif -%}
    {%- if (message['role'] == 'assistant') -%}
        {%- set role = "model" -%}
    {%- else -%}
        {%- set role = message['role'] -%}
    {%- endif -%}
    {{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else "") }}
    {%- if message['content'] is string -%}
        {{ message['content'] | trim }}
    {%- elif message['content'] is iterable -%}
        {%- for item in message['content'] -%}
            {%- if item['type'] == 'image' -%}
                {{ '<start_of_image>' }}
            {%- elif item['type'] == 'text' -%}
                {{ item['text'] | trim }}
            {%- endif -%}
        {%- endfor -%}
    {%- else -%}
        {{ raise_exception("Invalid content type") }}
    {%- endif -%}
    {{ '<end_of_turn>\n' }}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{'<start_of_turn>model\n'}}
{%- endif -%}
"""  # noqa: E501 (verbatim)

_LLAMA3 = (
  "{% set loop_messages = messages %}{% for message in loop_messages %}"
  "{% set content = '<|start_header_id|>' + message['role'] + "
  "'<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}"
  "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
  "{{ content }}{% endfor %}{% if add_generation_prompt %}"
  "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)

BUILT_IN = {
  "chatml": BuiltIn(_CHATML, ("<|im_start|>", "<|im_end|>"), False),
  "gemma": BuiltIn(_GEMMA, ("<start_of_turn>", "<end_of_turn>"), True),
  "llama3": BuiltIn(
    _LLAMA3, ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"), True
  ),
}


def is_file(value: str) -> bool:
  """Whether a `data.chat_template` value names a Jinja file."""
  return value not in (OWN, NONE, *BUILT_IN)


def resolve(value: str, tokenizer: Tokenizer, field: str) -> Tokenizer:
  """`tokenizer` rendering with the template `value` names (`field` is the
  setting, for errors): the checkpoint's own (""), none ("none"), a
  built-in name or a Jinja file.

  Raises:
    ValueError: naming `field`: a built-in template's special tokens that
      are not single tokens of the vocabulary (or a BOS it renders and the
      tokenizer lacks), or a file that cannot be read.
  """
  if value == OWN:
    return tokenizer
  if value == NONE:
    return tokenizer.with_chat_template(None, f"{field} {NONE!r}")
  if value in BUILT_IN:
    missing = [t for t in BUILT_IN[value].tokens if not _single(tokenizer, t)]
    if BUILT_IN[value].uses_bos and tokenizer.bos_id is None:
      missing.append("bos_token")
    if missing:
      raise ValueError(
        f"{field} {value!r}: the tokenizer's vocabulary lacks its special "
        f"tokens {missing} (each must be one token): pick the template of "
        f"the base's family (built in: {sorted(BUILT_IN)}) or a Jinja file"
      )
    return tokenizer.with_chat_template(
      BUILT_IN[value].text, f"{field} {value!r}"
    )
  path = pathlib.Path(value)
  try:
    text = path.read_text(encoding="utf-8")
  except (OSError, UnicodeDecodeError) as e:
    raise ValueError(
      f"{field}: {value!r} is neither a built-in template "
      f"{sorted(BUILT_IN)}, {NONE!r}, nor a readable Jinja file ({e})"
    ) from e
  return tokenizer.with_chat_template(text, f"{field} file {path}")


def _single(tokenizer: Tokenizer, token: str) -> bool:
  """Whether `token` in a text encodes to exactly its own one id."""
  token_id = tokenizer.token_to_id(token)
  return token_id is not None and tokenizer.encode_offsets(token)[0] == [
    token_id
  ]
