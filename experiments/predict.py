"""Predictions of a trained run on new inputs.

python -m experiments.predict --workdir RUN --input FILE.jsonl --out OUT.jsonl
python -m experiments.predict --workdir RUN --text "a sentence" --text ...
python -m experiments.predict --workdir RUN --chat      # a language model
python -m experiments.predict --workdir RUN --chat --base   # its base

A classification run reads `{"text": ...}` lines (with a `"label"`, the
accuracy is printed) and writes each line with `predicted`, `probability`
and `probabilities`; a language model reads `{"prompt": ...}` (or
`{"text": ...}`) lines and writes each with its `completion` (greedy, or
sampled with --temperature / --top_k / --top_p). The model is rebuilt from
RUN/config.json with the latest checkpoint (or --step). Without --input,
the --text values are predicted and printed. OUT.jsonl is written whole,
never over the input, into RUN or over the base checkpoint, and replaces
an existing file only with --overwrite (checked before the model loads).
"""

import json
import sys

from absl import app, flags

from qlora_jax.engine import cli, predict, prompt_fit
from qlora_jax.engine.settings import CAUSAL_LM, CLASSIFICATION

_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory.")
_INPUT = flags.DEFINE_string("input", None, "JSONL file to predict.")
_OUT = flags.DEFINE_string("out", None, "JSONL output (with --input).")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace an existing --out.")
_TEXT = flags.DEFINE_multi_string("text", [], "Texts or prompts to predict.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (latest).")
_BATCH = flags.DEFINE_integer("batch_size", None, "Rows per batch.")
_NEW = flags.DEFINE_integer("max_new_tokens", 64, "Language models.")
_TEMPERATURE = flags.DEFINE_float("temperature", 0.0, "0: greedy.")
_TOP_K = flags.DEFINE_integer("top_k", 0, "Sampling: keep the k best.")
_TOP_P = flags.DEFINE_float("top_p", 1.0, "Sampling: nucleus mass.")
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed.")
_CHAT = flags.DEFINE_bool(
  "chat", False, "Chat in the terminal: a line in, a streamed answer out."
)
_BASE = flags.DEFINE_bool(
  "base",
  False,
  "The run's base instead (its adapters off): the same prompts, template "
  "and settings, answered as before training.",
)
flags.mark_flags_as_required(["workdir"])


def main(argv):
  del argv
  prompt_fit.check_options(
    _NEW.value, _TEMPERATURE.value, _TOP_K.value, _TOP_P.value, _BATCH.value
  )
  if _CHAT.value:
    _chat()
    return
  if bool(_INPUT.value) == bool(_TEXT.value):
    raise app.UsageError("give either --input FILE.jsonl, --text or --chat")
  if _INPUT.value and not _OUT.value:
    raise app.UsageError("--input needs --out")
  if _INPUT.value:
    predict.check_out(
      _WORKDIR.value, _INPUT.value, _OUT.value, _OVERWRITE.value
    )
  predictor = predict.load(_WORKDIR.value, _STEP.value, _BASE.value)
  kwargs = {}
  if _BATCH.value:
    kwargs["batch_size"] = _BATCH.value
  if predictor.task == CAUSAL_LM:
    kwargs |= dict(
      max_new_tokens=_NEW.value,
      temperature=_TEMPERATURE.value,
      top_k=_TOP_K.value,
      top_p=_TOP_P.value,
      seed=_SEED.value,
    )
  if _INPUT.value:
    summary = predict.predict_file(
      predictor, _INPUT.value, _OUT.value, _OVERWRITE.value, **kwargs
    )
    print(json.dumps(dict(summary, out=_OUT.value)))
    return
  if predictor.task == CLASSIFICATION:
    results = predict.classify(predictor, _TEXT.value, **kwargs)
  else:
    completions = predict.complete(predictor, _TEXT.value, **kwargs)
    results = [{"completion": c} for c in completions]
  for text, result in zip(_TEXT.value, results, strict=True):
    print(json.dumps({"text": text, **result}))


def _chat() -> None:
  """A line in, the fine-tuned model's streamed answer out; the
  conversation so far is the context. An empty line or EOF ends it."""
  predictor = predict.load(_WORKDIR.value, _STEP.value, _BASE.value)
  messages = []
  which = "base model (adapters off)" if _BASE.value else "fine-tuned model"
  print(f"chat with the {which} (an empty line ends it)", flush=True)
  # Bytes that are not UTF-8 reach `_decoded` as surrogates.
  sys.stdin.reconfigure(encoding="utf-8", errors="surrogateescape")
  while True:
    try:
      line = _decoded(input("> "))
    except EOFError:
      break
    if not line.strip():
      break
    messages.append({"role": "user", "content": line})
    reply = []
    for piece in predict.chat_reply(
      predictor,
      messages,
      _NEW.value,
      temperature=_TEMPERATURE.value,
      top_k=_TOP_K.value,
      top_p=_TOP_P.value,
      seed=_SEED.value,
    ):
      print(piece, end="", flush=True)
      reply.append(piece)
    print(flush=True)
    messages.append({"role": "assistant", "content": "".join(reply)})


def _decoded(line: str) -> str:
  """`line` with bytes that are not UTF-8 replaced by U+FFFD, saying so."""
  raw = line.encode("utf-8", "surrogateescape")
  try:
    return raw.decode("utf-8")
  except UnicodeDecodeError as e:
    print(
      f"warning: the input is not valid UTF-8 ({e.reason} at byte "
      f"{e.start}): such bytes read as U+FFFD",
      file=sys.stderr,
      flush=True,
    )
    return raw.decode("utf-8", "replace")


if __name__ == "__main__":
  cli.run(main)
