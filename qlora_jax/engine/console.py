"""What a run prints, and the one console policy of every entry point.

stdout carries the report: the pipeline summary, a line per evaluation,
sample predictions, the final metrics and where the outputs went. The
progress line goes to stderr: a tqdm bar on a terminal, else a plain line
per `train.log_every` steps. Log records are for debugging: entry points
call `configure_logging()` (through `cli.run`), which keeps absl at WARNING
unless `-v` is given, drops orbax's records below WARNING in any case, and
its logged tracebacks (an error the entry point reports in one line, or a
Ctrl-C in a save) unless `-v 1`.
"""

import dataclasses
import logging as std_logging
import pathlib
import sys
import time
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
import tqdm
from absl import flags, logging

from qlora_jax import nn as qnn
from qlora_jax import quant
from qlora_jax.engine.settings import CLASSIFICATION, Settings
from qlora_jax.harness.evaluate import headline


class _QuietOrbax(std_logging.Filter):
  tracebacks = False  # orbax's logged tracebacks shown (-v 1)

  def filter(self, record: std_logging.LogRecord) -> bool:
    quiet = "orbax" in record.pathname or "tensorstore" in record.pathname
    if not quiet:
      return True
    if record.levelno < std_logging.WARNING:
      return False
    return record.exc_info is None or self.tracebacks


_FILTER = _QuietOrbax()


def configure_logging() -> None:
  """absl at WARNING unless `-v`/`--verbosity` was given; no orbax INFO,
  no orbax traceback unless -v 1."""
  verbosity = flags.FLAGS["verbosity"] if "verbosity" in flags.FLAGS else None
  if verbosity is None or not verbosity.present:
    logging.set_verbosity(logging.WARNING)
  _FILTER.tracebacks = verbosity is not None and verbosity.value >= 1
  handler = logging.get_absl_handler()
  if _FILTER not in handler.filters:
    handler.addFilter(_FILTER)


def _main_process() -> bool:
  return jax.process_index() == 0


def say(line: str = "") -> None:
  """Prints a report line (process 0 only) without breaking a progress bar."""
  if _main_process():
    tqdm.tqdm.write(line, file=sys.stdout)
    sys.stdout.flush()


@dataclasses.dataclass
class Summary:
  lines: list[str]
  numbers: dict[str, Any]


def _mb(n: int) -> str:
  return f"{n / 1e6:,.1f} MB"


def _millions(n: int) -> str:
  return f"{n / 1e6:,.2f}M" if n >= 1e5 else f"{n:,}"


def _float_bytes(tree) -> int:
  """Bytes of `tree` with every quantized tensor counted in its float dtype."""
  total = 0
  for leaf in qnn.flatten(tree).values():
    if isinstance(leaf, quant.QuantizedTensor):
      stack = int(np.prod(leaf.codes.shape[:-1], dtype=np.int64))
      total += stack * leaf.size * np.dtype(leaf.dtype).itemsize
    else:
      total += int(np.prod(leaf.shape)) * np.dtype(leaf.dtype).itemsize
  return total


def _linear_only(tree) -> dict:
  flat = qnn.flatten(tree)
  return qnn.unflatten({k: v for k, v in flat.items() if k[-1] == "weight"})


def _layer_counts(base, plan: qnn.Plan) -> tuple[int, int]:
  """(adapted, quantized) linear layers, each layer of a scanned stack
  counted once."""
  adapted = quantized = 0
  for path, leaf in qnn.flatten(base).items():
    if path[-1] != "weight":
      continue
    codes = leaf.codes if isinstance(leaf, quant.QuantizedTensor) else None
    lead = codes.shape[:-1] if codes is not None else np.shape(leaf)[:-2]
    layers = int(np.prod(lead, dtype=np.int64))
    spec = plan.lookup("/".join(path[:-1]))
    adapted += layers * (spec.lora is not None)
    quantized += layers * (spec.quant is not None)
  return adapted, quantized


def _quant_text(s: Settings) -> str:
  if s.quant_plan() is None:
    return "float (no quantization)"
  q = s.quant_plan().spec
  dq = " + double quant" if q.double_quant else ""
  return f"{q.data_type}, block {q.block_size}{dq}"


def pipeline_summary(
  s: Settings, loaded, trainable, frozen, mesh, plan_file: pathlib.Path
) -> Summary:
  """The lines and numbers that describe a run before it trains."""
  variables = loaded.variables
  base = variables.get(qnn.BASE, {})
  new = variables.get(qnn.PARAMS, {})
  n_base = qnn.num_params(base)
  n_all = n_base + qnn.num_params(new)
  n_train = qnn.num_params(trainable)
  plan = loaded.plan
  linear = _linear_only(base)
  before, after = _float_bytes(base), qnn.num_bytes(base)
  lin_before, lin_after = _float_bytes(linear), qnn.num_bytes(linear)
  lin_params = qnn.num_params(linear)
  bits = 8 * lin_after / max(lin_params, 1)
  name = s.model.checkpoint or "random init"
  devices = jax.devices()
  mesh_text = " x ".join(f"{k} {v}" for k, v in mesh.shape.items())
  lines = [
    f"devices          {len(devices)} x {devices[0].platform} "
    f"({jax.process_count()} process(es)), mesh {mesh_text}",
    f"base model       {name} ({loaded.config.model_type}): "
    f"{_millions(n_base)} parameters",
  ]
  if loaded.stats is not None:
    st = loaded.stats
    lines.append(
      f"loaded           {st.num_tensors} tensors in {st.seconds:.1f} s, "
      f"peak RSS {st.peak_rss_bytes / 2**20:,.0f} MiB"
    )
  adapted, quantized = _layer_counts(base, plan)
  lines += [
    f"linear layers    {adapted} with adapters, "
    f"{quantized} quantized ({_quant_text(s)})",
    f"trainable        {_millions(n_train)} of {_millions(n_all)} "
    f"({100 * n_train / max(n_all, 1):.2f}%), mode {s.train.mode}",
    f"base bytes       {_mb(before)} as floats -> {_mb(after)} stored",
    f"linear layers    {_mb(lin_before)} -> {_mb(lin_after)} "
    f"({bits:.3f} bits/param)",
    f"layer plan       {plan_file}",
  ]
  numbers = {
    "base_params": n_base,
    "trainable_params": n_train,
    "trainable_fraction": n_train / max(n_all, 1),
    "base_bytes_float": before,
    "base_bytes_stored": after,
    "linear_bytes_float": lin_before,
    "linear_bytes_stored": lin_after,
    "linear_bits_per_param": bits,
  }
  return Summary(lines, numbers)


def show_summary(summary: Summary) -> None:
  for line in summary.lines:
    say(line)


def show_table_header(
  resumed_from: int | None,
  answers: bool,
  columns: Sequence[str] = (),
  grpo: bool = False,
) -> None:
  """The eval table's header, after where a resumed run picks up;
  `columns` are the "task/metric" keys of the lm-eval tasks shown. GRPO's
  evaluation is of greedy completions: their reward, pass@1 and length."""
  if resumed_from is not None:
    say(f"resumed from     step {resumed_from}")
  extra = f" {'answer acc':>10}" if answers else ""
  extra += "".join(f" {c}" for c in columns)
  scores = f"{'eval loss':>10} {'eval acc':>9}"
  if grpo:
    scores = f"{'reward':>10} {'pass@1':>9} {'length':>7}"
  say(f"{'step':>10} {'train loss':>11} {scores}{extra}")


def eval_line(
  step: int,
  total: int,
  train_loss: float | None,
  m: dict,
  columns: Sequence[str] = (),
  note: str = "",
):
  """One row of the eval table (train loss "-" before any training), with
  the lm-eval task metrics `columns` and an optional note after it
  ("zero-shot baseline")."""
  train = "-" if train_loss is None else f"{train_loss:.4f}"
  extra = f" {m['answer_accuracy']:>10.4f}" if "answer_accuracy" in m else ""
  for c in columns:  # "task/metric", or a task: its first metric
    key = c if c in m else next(iter(headline(m, c)), None)
    extra += f" {m[key]:>{len(c)}.4f}" if key else f" {'-':>{len(c)}}"
  if "perplexity" in m:
    extra += f" {m['perplexity']:>9.2f} ppl"
  if note:
    extra += f"  ({note})"
  if "pass@1" in m:  # GRPO
    scores = (
      f"{m['reward']:>10.4f} {m['pass@1']:>9.4f} {m['completion_length']:>7.1f}"
    )
  else:
    scores = f"{m['loss']:>10.4f} {m['accuracy']:>9.4f}"
  say(f"{step:>5}/{total:<4} {train:>11} {scores}{extra}")


def show_answers(prompts, said: list[str], shown: int) -> None:
  """`shown` eval prompts, evenly spaced: prompt -> generated answer."""
  say("predictions (eval): prompt -> generated answer")
  step = max(1, len(said) // shown)
  for i in range(0, min(len(said), step * shown), step):
    text = " ".join(prompts.texts[i].split())
    text = text if len(text) <= 60 else "..." + text[-57:]
    right = said[i].strip().rstrip(".").strip().lower() == (
      prompts.answers[i].strip().rstrip(".").strip().lower()
    )
    mark = "ok " if right else "err"
    say(
      f"  {mark} {text} -> {said[i].strip()!r} (label {prompts.answers[i]!r})"
    )


class Progress:
  """Steps, loss, tokens/s and ETA on stderr: a tqdm bar on a terminal,
  else a plain line per update."""

  def __init__(self, total_steps: int, start_step: int = 0):
    self.total, self.start = total_steps, start_step
    self.t0 = time.perf_counter()
    self._bar = None
    if _main_process() and sys.stderr.isatty():
      self._bar = tqdm.tqdm(
        total=total_steps,
        initial=start_step,
        file=sys.stderr,
        unit="step",
        dynamic_ncols=True,
        leave=False,
      )

  def update(
    self, step: int, loss: float, tokens_per_s: float, note: str = ""
  ) -> None:
    """`note`: more of the step after its loss (GRPO's mean reward)."""
    if not _main_process():
      return
    note = f" {note}" if note else ""
    if self._bar is not None:
      self._bar.update(step - self._bar.n)
      self._bar.set_postfix_str(
        f"loss {loss:.4f}{note}, {tokens_per_s:,.0f} tok/s"
      )
      return
    done = step - self.start
    elapsed = time.perf_counter() - self.t0
    eta = elapsed / max(done, 1) * (self.total - step)
    sys.stderr.write(
      f"step {step}/{self.total} loss {loss:.4f}{note} "
      f"{tokens_per_s:,.0f} tok/s "
      f"eta {eta:,.0f}s\n"
    )
    sys.stderr.flush()

  def close(self) -> None:
    if self._bar is not None:
      self._bar.close()


def show_predictions(run_data, predictions, shown: int) -> None:
  """`shown` eval examples, evenly spaced, with predicted and true label."""
  names = run_data.label_map.names
  labels = np.asarray(run_data.eval["labels"])
  say("predictions (eval):")
  step = max(1, len(labels) // shown)
  for i in range(0, min(len(labels), step * shown), step):
    text = run_data.eval_texts[i].replace("\n", " ")
    text = text if len(text) <= 70 else text[:67] + "..."
    pred = names[int(predictions["predicted"][i])]
    mark = "ok " if pred == names[int(labels[i])] else "err"
    say(f"  {mark} {pred:<11} (label {names[int(labels[i])]:<11}) {text}")


def show_final(workdir: pathlib.Path, task: str, eval_metrics: dict) -> None:
  final = ", ".join(f"{k} {v:.4f}" for k, v in eval_metrics.items())
  say(f"final eval: {final}")
  say(f"checkpoints: {workdir / 'checkpoints'}")
  say(f"metrics:     {workdir / 'metrics.jsonl'} (+ tensorboard/)")
  say(f"curves:      {workdir / 'curves.png'}")
  if task == CLASSIFICATION or (workdir / "predictions.jsonl").is_file():
    say(f"predictions: {workdir / 'predictions.jsonl'}")
