"""Preference pairs from a model's own answers, for DPO.

The docstring task of a run's config (`data.source` "stdlib_questions":
the same questions, split and counts) is answered greedily by the run's
model with its adapters off, the reference policy a DPO run of it starts
from. Each question whose answer is not the one asked for
(`answers.same_answer`) becomes a pair: chosen = the expected answer,
rejected = the model's own answer. Questions it answers right, or with
nothing, give no pair.
"""

import json
import logging
import pathlib

from qlora_jax import data
from qlora_jax.engine import answers, dpo, outputs, setup
from qlora_jax.engine.settings import Settings


def write_pairs(
  s: Settings, folder: pathlib.Path, max_new_tokens: int
) -> dict[str, dict[str, int]]:
  """Writes `folder`/train.jsonl and eval.jsonl of {"prompt", "chosen",
  "rejected"} rows; returns per split the questions, the pairs, and the
  questions answered right.

  Raises:
    ValueError: naming data.source when it is not "stdlib_questions".
  """
  if s.data.source != "stdlib_questions":
    raise ValueError(
      f"data.source: pairs are made from 'stdlib_questions', got "
      f"{s.data.source!r}"
    )
  s, base = setup.check_run(s)
  tok = base.tokenizer
  folder = pathlib.Path(folder)
  questions = data.write_stdlib_questions(
    folder / "questions",
    s.data.questions_per_class,
    s.data.eval_questions_per_class,
  )
  loaded = setup.load_model(s, base, None)
  model = dpo.adapters_off(loaded.model)
  counts = {}
  for split, path in zip(("train", "eval"), questions, strict=True):
    examples = data.read_examples(path, "instruction")
    prompts = answers.make_prompts(examples, tok, s.data.max_length)
    said = answers.generate_answers(
      model,
      loaded.variables,
      prompts,
      tok,
      s.train.batch_size,
      max_new_tokens,
    )
    rows, right = [], 0
    for e, answer in zip(examples, said, strict=True):
      if answers.same_answer(answer, e.completion):
        right += 1
      elif answer.strip():
        rows.append(
          {"prompt": e.prompt, "chosen": e.completion, "rejected": answer}
        )
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    outputs.write_text(folder / f"{split}.jsonl", text)
    counts[split] = {
      "questions": len(examples),
      "pairs": len(rows),
      "right": right,
    }
    logging.info("%s: %s", split, counts[split])
  return counts
