"""A run's chat template (`data.chat_template`) written into its exports.

A run that names a template renders and stops with it, so its exports
carry it in place of the base's: `tokenizer_config.json` (and
`chat_template.jinja` where the base had one) of a Hugging Face folder,
its end-of-turn token among `generation_config.json`'s EOS ids; the GGUF
keys `tokenizer.chat_template` and `tokenizer.ggml.eot_token_id`.
"""

import dataclasses
import json
import pathlib

TEMPLATE_KEY = "tokenizer.chat_template"
EOT_KEY = "tokenizer.ggml.eot_token_id"


@dataclasses.dataclass(frozen=True)
class RunTemplate:
  """The template a run chose over its base's.

  Attributes:
    text: the Jinja template, or None (the run chose none: the export
      carries none).
    end_of_turn_id: the token it writes after an assistant's text, or None.
  """

  text: str | None
  end_of_turn_id: int | None = None


def write_to_folder(out: pathlib.Path, template: RunTemplate) -> None:
  """Puts `template` into the tokenizer files of the folder `out`."""
  config_file = out / "tokenizer_config.json"
  config = _read(config_file)
  config.pop("chat_template", None)
  if template.text is not None:
    config["chat_template"] = template.text
  config_file.write_text(json.dumps(config, indent=2, ensure_ascii=False))
  jinja = out / "chat_template.jinja"  # read before tokenizer_config's
  if jinja.is_file():
    jinja.unlink()
    if template.text is not None:
      jinja.write_text(template.text, encoding="utf-8")
  generation = out / "generation_config.json"
  if template.end_of_turn_id is not None and generation.is_file():
    g = _read(generation)
    eos = g.get("eos_token_id")
    eos = [] if eos is None else eos if isinstance(eos, list) else [eos]
    if template.end_of_turn_id not in eos:
      g["eos_token_id"] = [*eos, template.end_of_turn_id]
    generation.write_text(json.dumps(g, indent=2))


def _read(path: pathlib.Path) -> dict:
  if not path.is_file():
    return {}
  value = json.loads(path.read_text(encoding="utf-8"))
  if not isinstance(value, dict):
    raise ValueError(f"{path}: expected a JSON object")
  return value
