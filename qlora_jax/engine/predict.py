"""Predictions of a trained run: labels for texts, completions for prompts.

The model is rebuilt from the run's config.json with the trainable tree of
a checkpoint (`engine.restore.restore`), and texts are encoded exactly as
training encoded them: a classification text truncated to
`data.max_length` with the tokenizer's special tokens; a prompt as the
tokenizer's prefix specials and the prompt's own tokens (what precedes the
completion in instruction tuning). Inputs are cut into batches of a fixed
size, the last one padded, so that a file of any length compiles once.
"""

import dataclasses
import functools
import json
import os
import pathlib
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from qlora_jax.data import arrays
from qlora_jax.data.readers import read_records
from qlora_jax.data.tokenizer import Tokenizer
from qlora_jax.engine import dpo, losses, outputs, prompt_fit, restore, setup
from qlora_jax.engine.settings import CAUSAL_LM, CLASSIFICATION
from qlora_jax.models import generation


@dataclasses.dataclass
class Predictor:
  """A restored run and its tokenizer.

  Attributes:
    run: the run's model with its trained variables.
    tokenizer: the base checkpoint's tokenizer.
    task: "classification" or "causal_lm".
    max_length: the run's `data.max_length` (classification inputs).
    label_names: label of each class id (classification), else None.
    workdir: the run's workdir.
  """

  run: restore.Restored
  tokenizer: Tokenizer
  task: str
  max_length: int
  label_names: list[str] | None
  workdir: pathlib.Path


def load(
  workdir: str | os.PathLike, step: int | None = None, base: bool = False
) -> Predictor:
  """The run in `workdir` at checkpoint `step` (the latest by default).

  With `base`, the run's model with its adapters off (`dpo.adapters_off`):
  the base exactly as the run holds it (its quantized weights, the run's
  chat template and settings), which is what the run started from, since
  LoRA's B starts at zero. Only a LoRA run of a language model that trains
  nothing but its adapters has one.

  Raises:
    ValueError: naming the setting, for `base` on any other run.
  """
  run = restore.restore(workdir, step)
  if base:
    s = run.settings
    why = None
    if s.model.task != CAUSAL_LM:
      why = f"model.task is {s.model.task!r} (its head trains too)"
    elif s.train.mode != "lora" or not s.lora.enabled:
      why = f"train.mode {s.train.mode!r} with lora.enabled {s.lora.enabled}"
    elif s.train.train_modules:
      why = f"train.train_modules {list(s.train.train_modules)} train too"
    if why:
      raise ValueError(
        f"{workdir}: --base needs a LoRA run that trains only its "
        f"adapters, and this run's {why}: turning its adapters off does "
        "not give its base"
      )
    lm = dataclasses.replace(run.lm, model=dpo.adapters_off(run.lm.model))
    run = dataclasses.replace(run, lm=lm)
  tokenizer = run.tokenizer
  if tokenizer is None:
    raise ValueError(
      f"{workdir}: the run's model.checkpoint "
      f"{run.settings.model.checkpoint!r} has no tokenizer.json, so texts "
      "cannot be encoded"
    )
  names = None
  if run.labels is not None:
    names = [None] * len(run.labels)
    for label, i in run.labels.items():
      names[int(i)] = label
  return Predictor(
    run,
    tokenizer,
    run.settings.model.task,
    run.settings.data.max_length,
    names,
    pathlib.Path(workdir),
  )


def _batches(n: int, batch_size: int):
  if batch_size < 1:
    raise ValueError(f"batch_size must be >= 1, got {batch_size}")
  for start in range(0, n, batch_size):
    yield start, min(n, start + batch_size)


def _pad_rows(x: np.ndarray, rows: int) -> np.ndarray:
  """`x` with its first row repeated up to `rows` rows."""
  if len(x) == rows:
    return x
  return np.concatenate([x, np.repeat(x[:1], rows - len(x), axis=0)])


@functools.partial(jax.jit, static_argnames=("model",))
def _probabilities(model, variables, batch):
  """Class probabilities of a batch (compiled once per model and shape)."""
  out = losses.logits(model, variables, batch, deterministic=True)
  return jax.nn.softmax(out, axis=-1)


def classify(
  predictor: Predictor, texts: Sequence[str], batch_size: int = 32
) -> list[dict[str, Any]]:
  """Each text's predicted label, its probability, and every class's."""
  if predictor.task != CLASSIFICATION:
    raise ValueError(
      f"the run's model.task is {predictor.task!r}: classify needs a "
      "classification run (use complete for language models)"
    )
  if not texts:
    return []
  tok = predictor.tokenizer
  ids = tok.encode_batch(list(texts), max_length=predictor.max_length)
  for i, row in enumerate(ids):
    if len(row) <= tok.num_special_tokens:
      raise ValueError(f"text {i} encodes to no tokens: {texts[i]!r}")
  batch = arrays.classification_arrays(
    ids, np.zeros(len(ids), np.int32), predictor.max_length, tok.pad_id
  )
  del batch["labels"]
  lm = predictor.run.lm
  size = min(batch_size, len(ids))
  out = []
  for start, stop in _batches(len(ids), size):
    b = {
      k: jnp.asarray(_pad_rows(v[start:stop], size)) for k, v in batch.items()
    }
    out.append(
      np.asarray(_probabilities(lm.model, lm.variables, b))[: stop - start]
    )
  probs = np.concatenate(out)
  names = predictor.label_names
  return [
    {
      "predicted": names[int(np.argmax(p))],
      "probability": float(np.max(p)),
      "probabilities": {n: float(q) for n, q in zip(names, p, strict=True)},
    }
    for p in probs
  ]


def prompt_ids(tokenizer: Tokenizer, prompts: Sequence[str]) -> list[list[int]]:
  """Each prompt as training saw it before its completion: with a chat
  template, a user turn and the generation prompt; else the tokenizer's
  prefix specials, then the prompt's own tokens."""
  if tokenizer.chat_template is not None:
    rows = [
      tokenizer.encode_offsets(
        tokenizer.apply_chat_template([{"role": "user", "content": p}], True)
      )[0]
      for p in prompts
    ]
  else:
    prefix = list(tokenizer.special_prefix)
    bodies = tokenizer.encode_batch(list(prompts), add_special_tokens=False)
    rows = [prefix + body for body in bodies]
  for i, row in enumerate(rows):
    if not row:
      raise ValueError(f"prompt {i} encodes to no tokens: {prompts[i]!r}")
  return rows


def complete(
  predictor: Predictor,
  prompts: Sequence[str],
  max_new_tokens: int = 64,
  *,
  temperature: float = 0.0,
  top_k: int = 0,
  top_p: float = 1.0,
  seed: int = 0,
  batch_size: int = 8,
) -> list[str]:
  """The completion of each prompt (greedy when temperature is 0).

  Prompts are left-padded to the longest one; a completion ends at the
  tokenizer's end token (EOS, else SEP) or its chat template's end of
  turn (without either, the model's EOS) or after `max_new_tokens`. A
  prompt longer than the model's context leaves beside `max_new_tokens`
  keeps its last tokens (`prompt_fit`).
  """
  prompt_fit.check_options(max_new_tokens, temperature, top_k, top_p)
  if predictor.task != CAUSAL_LM:
    raise ValueError(
      f"the run's model.task is {predictor.task!r}: complete needs a "
      "causal_lm run (use classify for classifiers)"
    )
  if not prompts:
    return []
  tok = predictor.tokenizer
  lm = predictor.run.lm
  room, limit = prompt_fit.room(lm.config.max_positions, max_new_tokens)
  rows = prompt_fit.fit(prompt_ids(tok, prompts), room, "prompt", limit)
  width = max(len(r) for r in rows)
  ids = np.full((len(rows), width), tok.pad_id, np.int32)
  mask = np.zeros((len(rows), width), np.int32)
  for i, r in enumerate(rows):
    ids[i, width - len(r) :] = r
    mask[i, width - len(r) :] = 1
  if tok.stop_ids:
    eos = list(tok.stop_ids)
  else:
    eos = list(getattr(lm.config, "eos_token_ids", ()))
  rng = jax.random.key(seed)
  size = min(batch_size, len(rows))
  completions = []
  for start, stop in _batches(len(rows), size):
    rng, sub = jax.random.split(rng)
    new = generation.generate(
      lm.model,
      lm.variables,
      _pad_rows(ids[start:stop], size),
      _pad_rows(mask[start:stop], size),
      max_new_tokens=max_new_tokens,
      eos_token_id=eos or None,
      pad_token_id=tok.pad_id,
      temperature=temperature,
      top_k=top_k,
      top_p=top_p,
      rng=sub,
    )
    for row in np.asarray(new)[: stop - start]:
      completions.append(tok.decode(_until_end(row, eos)))
  if not any(c.strip() for c in completions):
    logging.warning(
      "all %d completions are empty: the model at checkpoint %d ends every "
      "answer at once, as the weights of a run that diverged or collapsed "
      "do",
      len(completions),
      predictor.run.step,
    )
  return completions


def chat_reply(
  predictor: Predictor,
  messages: Sequence[dict],
  max_new_tokens: int = 256,
  *,
  temperature: float = 0.0,
  top_k: int = 0,
  top_p: float = 1.0,
  seed: int = 0,
):
  """Yields the assistant's next message, piece by piece (text), for a
  conversation rendered with the checkpoint's chat template; it ends at
  the end-of-turn token. A conversation longer than the model's context
  leaves beside `max_new_tokens` keeps its last tokens (`prompt_fit`)."""
  prompt_fit.check_options(max_new_tokens, temperature, top_k, top_p)
  tok = predictor.tokenizer
  if tok.chat_template is None:
    raise ValueError("the run's tokenizer has no chat template: no chat")
  lm = predictor.run.lm
  room, limit = prompt_fit.room(lm.config.max_positions, max_new_tokens)
  ids = tok.encode_offsets(tok.apply_chat_template(messages, True))[0]
  (ids,) = prompt_fit.fit([ids], room, "conversation", limit)
  ends = list(tok.stop_ids)
  ends += list(getattr(lm.config, "eos_token_ids", ()))
  tokens, shown = [], ""
  for token in generation.stream(
    lm.model,
    lm.variables,
    ids,
    max_new_tokens=max_new_tokens,
    eos_token_id=tuple(ends),
    temperature=temperature,
    top_k=top_k,
    top_p=top_p,
    rng=jax.random.key(seed),
  ):
    tokens.append(token)
    text = tok.decode(tokens)
    if text.endswith("\ufffd"):  # half of a multi-byte character
      continue
    yield text[len(shown) :]
    shown = text


def _until_end(row: np.ndarray, eos: Sequence[int]) -> np.ndarray:
  """The generated tokens before the first end token."""
  ends = np.flatnonzero(np.isin(row, eos))
  return row[: ends[0]] if len(ends) else row


def _keep_off(workdir, base, path) -> outputs.KeepOff:
  return [
    ("the --input file", path),
    ("the run's workdir", workdir),
    ("the base checkpoint", base),
  ]


def check_out(
  workdir: str | os.PathLike,
  path: str | os.PathLike,
  out: str | os.PathLike,
  overwrite: bool = False,
) -> None:
  """Refuses `out` as `predict_file` would, before anything loads."""
  m = restore.read_settings(workdir).model
  base = setup.resolve_checkpoint(m.checkpoint) if m.checkpoint else None
  outputs.check(
    out,
    folder=False,
    overwrite=overwrite,
    keep_off=_keep_off(workdir, base, path),
  )


def predict_file(
  predictor: Predictor,
  path: str | os.PathLike,
  out: str | os.PathLike,
  overwrite: bool = False,
  **kwargs,
) -> dict[str, Any]:
  """Predicts every line of a JSONL file and writes one JSON line per input.

  Classification reads `{"text": ...}` lines (a `"label"` too, when known:
  the summary then has the accuracy); a language model reads `{"prompt":
  ...}` lines (or `{"text": ...}`). Each output line repeats the input's
  fields and adds `predicted`, `probability` and `probabilities`, or
  `completion`. Returns a summary: the number of rows, and the accuracy
  over labelled rows. `out` is written through `outputs.writing`: never
  the input, the run's workdir or its base; an existing file only with
  `overwrite`.
  """
  keep_off = _keep_off(predictor.workdir, predictor.run.base, path)
  with outputs.writing(
    out, folder=False, overwrite=overwrite, keep_off=keep_off
  ) as tmp:
    summary, lines = _predict_lines(predictor, path, **kwargs)
    tmp.write_text("".join(lines))
  return summary


def _predict_lines(predictor: Predictor, path, **kwargs):
  """(summary, output lines) of `predict_file`."""
  if predictor.task == CLASSIFICATION:
    records = read_records(path, ("text",))
    results = classify(predictor, [r["text"] for _, r in records], **kwargs)
  else:
    records = read_records(path, ("prompt", "text"))
    key = [("prompt" if "prompt" in r else "text") for _, r in records]
    prompts = [r[k] for (_, r), k in zip(records, key, strict=True)]
    results = [
      {"completion": c} for c in complete(predictor, prompts, **kwargs)
    ]
  summary: dict[str, Any] = {"rows": len(records)}
  labelled = [
    (r, p) for (_, r), p in zip(records, results, strict=True) if "label" in r
  ]
  if predictor.task == CLASSIFICATION and labelled:
    right = sum(str(r["label"]) == p["predicted"] for r, p in labelled)
    summary["labelled"] = len(labelled)
    summary["accuracy"] = right / len(labelled)
  lines = [
    json.dumps({**record, **result}) + "\n"
    for (_, record), result in zip(records, results, strict=True)
  ]
  return summary, lines
