"""Table 8: what merging an adapter into its 4-bit base costs.

Per seed, two runs of one config (the main job), each trained by the engine
in its own process and workdir (`sweep.run_point`, resumable): QLoRA over
NF4 + DQ and QA-LoRA over int4_asym in blocks of 32 (GGML's Q4_1). Six rows
are then evaluated on the runs' held-out set:

  a  the QLoRA adapter on its NF4 + DQ base, as trained
  b  a merged into a float32 base
  c  a merged and quantized again to NF4 + DQ (how 4-bit serving is done)
  d  the QA-LoRA adapter on its int4_asym base, as trained
  e  d merged exactly into int4_asym (block minimums; codes kept)
  f  e exported as a Q4_1 GGUF file (`export.export_gguf`) and read back

Columns: generated-answer accuracy and eval loss (the engine's measures),
the largest |logit| difference from the row each was made from over the
answer positions of the eval set, the share of greedy answer tokens equal
to that row's, and the bytes of the stored base. Each finished row is
appended to `rows.jsonl` under the output folder; a rerun skips finished
runs and rows.
"""

import dataclasses
import json
import pathlib
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
from ml_collections import config_dict

from qlora_jax import data, interop, models
from qlora_jax import nn as qnn
from qlora_jax.ablations import results, sweep
from qlora_jax.engine import answers, export, losses, restore, setup

ROWS = {  # row: (what it is, the row it is made from)
  "a": ("QLoRA NF4+DQ, adapter on base", None),
  "b": ("(a) merged into float32", "a"),
  "c": ("(a) merged, re-quantized to NF4+DQ", "a"),
  "d": ("QA-LoRA int4_asym/32, adapter on base", None),
  "e": ("(d) merged exactly into int4_asym", "d"),
  "f": ("(e) as a Q4_1 GGUF file, read back", "e"),
}
RUNS = {
  "qlora": {"quant.data_type": "nf4", "quant.double_quant": True},
  "qa_lora": {
    "quant.data_type": "int4_asym",
    "quant.block_size": 32,
    "quant.double_quant": False,
    "lora.qa": True,
  },
}
ROWS_FILE = "rows.jsonl"


@dataclasses.dataclass
class Outputs:
  """What one row's model does on the eval set."""

  loss: float
  accuracy: float
  answers: list[str]
  tokens: np.ndarray  # [examples, new tokens], greedy
  answer_logits: np.ndarray  # [answer positions, vocab]
  base_bytes: int


def evaluate(model, variables, settings, run_data, prompts) -> Outputs:
  """Eval loss, answers, greedy tokens and answer-position logits."""
  task = settings.model.task

  @jax.jit
  def fn(variables, batch):
    out = losses.logits(model, variables, batch, True)
    return losses.loss_sums(task, out, batch), out

  sums = {"loss": 0.0, "weight": 0.0, "correct": 0.0}
  kept = []
  it = data.EvalIterator(run_data.eval, settings.train.batch_size)
  for batch in it:
    batch_sums, out = fn(variables, batch)
    for k, v in batch_sums.items():
      sums[k] += float(v)
    mask = (
      np.asarray(batch["loss_mask"]) * np.asarray(batch["weights"])[:, None]
    )
    kept.append(np.asarray(out)[mask > 0])
  metrics = losses.summarize(task, sums)
  ends = answers.end_ids(run_data.tokenizer, model.config)
  tokens = answers.generate_ids(
    model,
    variables,
    prompts,
    run_data.tokenizer,
    settings.train.batch_size,
    settings.data.max_new_tokens,
  )
  said = [
    answers.decode_answer(row, ends, run_data.tokenizer) for row in tokens
  ]
  return Outputs(
    metrics["loss"],
    answers.accuracy(said, prompts.answers),
    said,
    tokens,
    np.concatenate(kept),
    qnn.num_bytes(variables[qnn.BASE]),
  )


def _variants(workdir: pathlib.Path, runs_dir: dict[str, pathlib.Path]):
  """{row: () -> (model, variables)} built lazily from the trained runs."""

  def trained(name):
    run = restore.restore(runs_dir[name])
    return run.lm.model, run.lm.variables

  def merged(name, requantize):
    run = restore.restore(runs_dir[name])
    variables, plan = interop.merge(run.lm.variables, run.lm.plan, requantize)
    return interop.merged_model(run.lm.model, plan), variables

  def f():
    out = workdir / "qa_lora_merged.gguf"
    export.export_gguf(runs_dir["qa_lora"], out, overwrite=True)
    settings = restore.read_settings(runs_dir["qa_lora"])
    lm = models.from_pretrained(
      out,
      quant=settings.quant_plan(),
      scan_layers=settings.model.scan_layers,
    )
    return lm.model, lm.variables

  return {
    "a": lambda: trained("qlora"),
    "b": lambda: merged("qlora", False),
    "c": lambda: merged("qlora", True),
    "d": lambda: trained("qa_lora"),
    "e": lambda: merged("qa_lora", True),
    "f": f,
  }


def _read_rows(path: pathlib.Path) -> list[dict]:
  if not path.is_file():
    return []
  rows = []
  for line in path.read_text().splitlines():
    try:
      rows.append(json.loads(line))
    except json.JSONDecodeError:  # a line torn by a kill: redone
      continue
  return rows


def compare(out: Outputs, source: Outputs | None) -> dict[str, Any]:
  """The row's figures, with differences from the row it came from."""
  row = {
    "answer_accuracy": out.accuracy,
    "eval_loss": out.loss,
    "base_bytes": out.base_bytes,
    "max_abs_logit": float(np.abs(out.answer_logits).max()),
  }
  if source is not None:
    diff = np.abs(out.answer_logits - source.answer_logits).max()
    row["max_logit_diff"] = float(diff)
    row["same_tokens"] = float(np.mean(out.tokens == source.tokens))
  return row


def run_seed(
  config: config_dict.ConfigDict,
  out_dir: str | pathlib.Path,
  seed: int,
  say: Callable[[str], None] = print,
) -> list[dict]:
  """Trains the two runs of `seed` (if not done) and evaluates every row
  not yet in `rows.jsonl`; returns this seed's rows."""
  out_dir = pathlib.Path(out_dir)
  seed_dir = out_dir / f"seed{seed}"
  runs_dir = {}
  for name, overrides in RUNS.items():
    workdir = seed_dir / name
    runs_dir[name] = workdir
    if sweep.status(workdir) != "done":
      say(f"seed {seed}: training {name} in {workdir}")
      cfg = sweep.apply_overrides(config, {**overrides, "train.seed": seed})
      if not sweep.run_point(cfg, workdir):
        raise RuntimeError(f"seed {seed} {name}: training failed ({workdir})")
  path = out_dir / ROWS_FILE
  done = {(r["seed"], r["row"]) for r in _read_rows(path)}
  if all((seed, row) in done for row in ROWS):
    return [r for r in _read_rows(path) if r["seed"] == seed]
  settings = restore.read_settings(runs_dir["qlora"])
  tokenizer = setup.load_tokenizer(
    setup.resolve_checkpoint(settings.model.checkpoint)
  )
  run_data = setup.make_data(settings, tokenizer, seed_dir / "data")
  examples = run_data.eval_examples[: settings.data.eval_generate]
  prompts = answers.make_prompts(examples, tokenizer, settings.data.max_length)
  build = _variants(seed_dir, runs_dir)
  outputs: dict[str, Outputs] = {}
  for row, (what, source) in ROWS.items():
    model, variables = build[row]()
    outputs[row] = evaluate(model, variables, settings, run_data, prompts)
    del model, variables
    jax.clear_caches()
    if (seed, row) in done:
      continue
    record = {"seed": seed, "row": row, "what": what, "from": source}
    record |= compare(outputs[row], outputs.get(source) if source else None)
    with path.open("a") as f:
      f.write(json.dumps(record) + "\n")
    say(f"seed {seed} row {row}: {json.dumps(record)}")
  return [r for r in _read_rows(path) if r["seed"] == seed]


def run_table(
  config: config_dict.ConfigDict,
  out_dir: str | pathlib.Path,
  seeds: Sequence[int],
  say: Callable[[str], None] = print,
) -> list[dict]:
  """Every seed's rows (see `run_seed`)."""
  rows = []
  for seed in seeds:
    rows += run_seed(config, out_dir, seed, say)
  return rows


COLUMNS = (  # (key, header, format)
  ("answer_accuracy", "accuracy", ".3f"),
  ("eval_loss", "eval loss", ".4f"),
  ("max_logit_diff", "max abs logit diff", ".3g"),
  ("same_tokens", "same greedy tokens", ".3f"),
  ("base_bytes", "base MB", ".1f"),
)


def _cell(values: list[float], fmt: str, scale: float = 1.0) -> str:
  mean, half, n = results.interval([v / scale for v in values])
  if n == 0:
    return "-"
  if n == 1 or len(set(values)) == 1:
    return f"{mean:{fmt}}"
  return f"{mean:{fmt}} ± {half:{fmt}}"


def markdown(rows: list[dict]) -> str:
  """The table: mean ± the half-width of the 95% Student t interval over
  seeds (none when every seed gave the same value), and n."""
  head = ["row", "model"] + [h for _, h, _ in COLUMNS] + ["n"]
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for row, (what, _) in ROWS.items():
    mine = [r for r in rows if r["row"] == row]
    cells = [row, what]
    for key, _, fmt in COLUMNS:
      scale = 1e6 if key == "base_bytes" else 1.0
      cells.append(_cell([r[key] for r in mine if key in r], fmt, scale))
    cells.append(str(len(mine)))
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"
