"""train_and_evaluate: the training loop over any device mesh.

One function runs a whole experiment from its config: the config is
checked into typed settings, the model loaded (quantized on load), its
trainable tree split off, the train step jitted once with explicit
shardings and donation; evaluation runs at a configured interval and at
the end; checkpoints (trainable state, optimizer, step, RNG, data
position) are saved with orbax and a rerun with the same workdir resumes
exactly where the last checkpoint left off.
"""

import dataclasses
import json
import pathlib
import time
from typing import Any

import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from qlora_jax import data
from qlora_jax import nn as qnn
from qlora_jax.engine import (
  answers,
  console,
  divergence,
  dpo,
  losses,
  memory_check,
  optim,
  profiling,
  rollouts,
  setup,
  sharding,
  steps,
  tasks,
)
from qlora_jax.engine import (
  workdir as run_dir,
)
from qlora_jax.engine.checkpoint import Checkpoints
from qlora_jax.engine.metrics import MetricsWriter, plot_curves, read_metrics
from qlora_jax.engine.rollouts import Rollouts
from qlora_jax.engine.settings import CLASSIFICATION, Settings


def _init_distributed(s: Settings) -> None:
  """jax.distributed for multi-host runs (JAX's usual environment)."""
  dist = s.distributed
  if not dist.enabled:
    return
  if dist.cpu_collectives:
    jax.config.update(
      "jax_cpu_collectives_implementation", dist.cpu_collectives
    )
  kwargs = {}
  for key in ("coordinator_address", "num_processes", "process_id"):
    if getattr(dist, key) is not None:
      kwargs[key] = getattr(dist, key)
  jax.distributed.initialize(**kwargs)


@dataclasses.dataclass
class Loop:
  """Everything the loop needs, built once (`_set_up`)."""

  settings: Settings
  workdir: pathlib.Path
  mesh: Any
  run_data: setup.RunData
  frozen: Any
  state: Any
  train_it: data.BatchIterator
  total_steps: int
  eval_every: int
  lr: Any
  train_fn: Any
  eval_fn: Any
  summary: console.Summary
  state_sh: Any
  classes: int  # V of the collapse rule: labels, or the vocabulary
  model: Any = None
  prompts: answers.Prompts | None = None
  plan_lines: list[str] = dataclasses.field(default_factory=list)
  objective: Any = None  # steps.train_step's: None (SFT), Dpo or Grpo
  task_eval: tasks.DuringTraining | None = None  # eval.tasks
  model_config: Any = None
  rollouts: Rollouts | None = None  # GRPO's generation batches

  @property
  def task(self) -> str:
    return self.settings.model.task


def _schedule_numbers(s: Settings, steps_per_epoch: int) -> tuple[int, int]:
  t = s.train
  if t.objective == "grpo":  # grpo.mu optimizer steps per batch of prompts
    steps_per_epoch *= s.grpo.mu
  total = t.steps or t.epochs * steps_per_epoch
  eval_every = t.eval_every or steps_per_epoch
  return total, eval_every


def _set_up(s: Settings, base: setup.Base, workdir: pathlib.Path) -> Loop:
  """Mesh, data, model, optimizer, sharded state and the jitted steps."""
  t = s.train
  mesh = sharding.make_mesh(s.mesh.data, s.mesh.fsdp)
  if t.batch_size % (t.grad_accum * sharding.batch_divisor(mesh)):
    raise ValueError(
      f"train.batch_size {t.batch_size} must be divisible by train.grad_accum "
      f"({t.grad_accum}) x the {sharding.batch_divisor(mesh)} batch shards"
    )
  run_data = setup.make_data(s, base.tokenizer, workdir)
  num_labels = len(run_data.label_map) if run_data.label_map else None
  _check_memory(s, base, mesh, num_labels)
  loaded = setup.load_model(s, base, num_labels, place=setup.place_on(mesh))
  trainable, frozen = setup.split_variables(s, loaded.variables)
  _warn_if_it_cannot_learn(s, trainable, run_data)
  objective = dpo.Dpo(s.dpo) if t.objective == "dpo" else None
  if objective is not None:  # the reference's log-probs, once (`dpo`)
    run_data = dpo.with_reference_data(
      run_data, loaded.model, trainable, frozen, t.batch_size, mesh
    )
  sampler = None
  if t.objective == "grpo":
    objective, sampler = rollouts.make(s, run_data, loaded.model, mesh)
  plan_file = workdir / "plan.txt"
  base = qnn.flatten(loaded.variables.get(qnn.BASE, {}))
  n_linear = sum(p[-1] == "weight" for p in base)
  plan_lines = qnn.plan_lines(loaded.plan, n_linear)
  train_it = data.BatchIterator(
    run_data.train,
    t.batch_size,
    seed=t.seed,
    process_index=jax.process_index(),
    process_count=jax.process_count(),
  )
  total_steps, eval_every = _schedule_numbers(s, train_it.steps_per_epoch)
  tx, lr = optim.make_optimizer(s.opt, total_steps)
  state = steps.create_state(trainable, tx, t.seed)
  state_sh = sharding.tree_shardings(mesh, state)
  frozen_sh = sharding.tree_shardings(mesh, frozen)
  batch_sh = sharding.batch_sharding(mesh)
  state = jax.device_put(state, state_sh)
  summary = console.pipeline_summary(
    s, loaded, trainable, frozen, mesh, plan_file
  )
  train_fn = steps.jit_train_step(
    loaded.model,
    s.model.task,
    tx,
    t.grad_accum,
    state_sh,
    batch_sh,
    frozen_sh,
    objective,
  )
  eval_fn = steps.jit_eval_step(
    loaded.model, s.model.task, state_sh.params, batch_sh, frozen_sh, objective
  )
  prompts = None
  if s.data.eval_generate:
    prompts = answers.make_prompts(
      run_data.eval_examples[: s.data.eval_generate],
      run_data.tokenizer,
      s.data.max_length,
    )
  task_eval = None
  if s.eval.tasks:
    task_eval = tasks.DuringTraining(s.eval, t.batch_size)
  return Loop(
    s,
    workdir,
    mesh,
    run_data,
    frozen,
    state,
    train_it,
    total_steps,
    eval_every,
    lr,
    train_fn,
    eval_fn,
    summary,
    state_sh,
    num_labels or loaded.config.vocab_size,
    loaded.model,
    prompts,
    plan_lines,
    objective,
    task_eval,
    loaded.config,
    rollouts=sampler,
  )


def _check_memory(
  s: Settings, base: setup.Base, mesh, num_labels: int | None
) -> None:
  """Refuses (or warns of) a run the memory model says cannot fit, before
  anything is loaded."""
  warning = memory_check.check_fits(
    s, base.config, mesh.size, num_labels=num_labels
  )
  if warning:
    logging.warning("%s", warning)


def _warn_if_it_cannot_learn(s: Settings, trainable, run_data) -> None:
  problems = []
  if qnn.num_params(trainable) == 0:
    problems.append(
      "nothing trains (0 trainable parameters): check lora.enabled, "
      "lora.targets and train.train_modules"
    )
  if run_data.label_map is not None and len(run_data.label_map) < 2:
    problems.append(
      f"the training data {s.data.train_path or s.data.source} has a single "
      "label: a classifier cannot learn anything from it"
    )
  for problem in problems:
    logging.warning("%s", problem)
    console.say(f"WARNING: {problem}")


def _restore(run: Loop, checkpoints: Checkpoints) -> tuple[int | None, dict]:
  """Resumes from the newest checkpoint that reads, if any: (its step,
  epoch sums). One that fails to read is reported by path and skipped."""
  for step in sorted(checkpoints.all_steps(), reverse=True):
    try:
      state, meta = checkpoints.restore(step, run.state)
    except Exception as e:  # orbax / tensorstore raise many kinds
      first = str(e).strip().splitlines()[0][:300] if str(e).strip() else ""
      moved = checkpoints.set_aside(step)
      logging.warning(
        "checkpoint %d does not read (%s: %s); moved to %s",
        step,
        type(e).__name__,
        first,
        moved,
      )
      console.say(
        f"warning: checkpoint {checkpoints.directory / str(step)} does not "
        f"read ({type(e).__name__}); moved to {moved}, using the one before"
      )
      continue
    run.state = state
    run.train_it.restore(meta["data"])
    return step, dict(meta["running"])
  return None, {"loss": 0.0, "weight": 0.0}


_NORMS = ("grad_norm", "update_norm", "param_norm")


def _check_step(run: Loop, metrics, step: int, checkpoints) -> float:
  """The step's mean loss; raises `divergence.DivergenceError` when the
  step diverged or collapsed (see `divergence`)."""
  loss = float(metrics["loss"]) / max(float(metrics["weight"]), 1e-9)
  numbers = {k: float(metrics[k]) for k in _NORMS}
  numbers.update(loss=loss, params_finite=bool(metrics["params_finite"]))
  found = divergence.diagnose(numbers, run.classes)
  if found is None:
    return loss
  what, started_bad = found
  good = divergence.last_good(checkpoints.all_steps(), step, started_bad)
  raise divergence.error(
    step, what, good, checkpoints.directory, run.settings.opt.learning_rate
  )


def _log_train(run, writer, step, loss, metrics, tok_s) -> None:
  weight = max(float(metrics["weight"]), 1e-9)
  writer.write(
    "train",
    step,
    {
      "loss": loss,
      **(
        {"accuracy": float(metrics["correct"]) / weight}
        if "correct" in metrics
        else {}
      ),
      "grad_norm": float(metrics["grad_norm"]),
      "update_norm": float(metrics["update_norm"]),
      "param_norm": float(metrics["param_norm"]),
      "learning_rate": float(run.lr(step - 1)),
      "tokens_per_s": tok_s,
      "epoch": run.train_it.epoch,
      **(run.rollouts.train_metrics(metrics) if run.rollouts else {}),
      **{  # DPO: mean rewards and margin per pair
        k: float(metrics[k]) / weight
        for k in ("chosen_reward", "rejected_reward", "margin")
        if k in metrics
      },
    },
  )


def train_and_evaluate(
  config, workdir: str, allow_safe_changes: bool = False
) -> dict[str, Any]:
  """Trains and evaluates as `config` says; returns the final eval metrics.

  A workdir that holds a run of another config is refused (see
  `qlora_jax.engine.workdir`; `allow_safe_changes` lets a rerun change how
  long it trains and how often it evaluates and saves), as is one that
  another live run holds.
  """
  s, base = setup.check_run(Settings.from_config(config))
  _init_distributed(s)
  workdir = pathlib.Path(workdir).absolute()
  main = jax.process_index() == 0
  if main:
    workdir.mkdir(parents=True, exist_ok=True)
    run_dir.check_config(workdir, s.to_dict(), allow_safe_changes)
  lock = run_dir.Lock(workdir)
  if main:
    lock.acquire()
  try:
    return _train(s, base, workdir)
  finally:
    lock.release()


def _record(run: Loop) -> None:
  """The run's config, plan and labels in its workdir, once its setup has
  succeeded (a config that fails to set up leaves no record behind)."""
  if jax.process_index() != 0:
    return
  workdir = run.workdir
  config = json.dumps(run.settings.to_dict(), indent=2)
  run_dir.write_atomic(workdir / run_dir.CONFIG, config)
  run_dir.write_plan(workdir / "plan.txt", run.plan_lines)
  label_map = run.run_data.label_map
  if label_map is not None:
    labels = json.dumps(label_map.to_dict(), indent=2, ensure_ascii=False)
    run_dir.write_atomic(workdir / "labels.json", labels + "\n")


def _train(
  s: Settings, base: setup.Base, workdir: pathlib.Path
) -> dict[str, Any]:
  run = _set_up(s, base, workdir)
  _record(run)
  console.show_summary(run.summary)
  checkpoints = Checkpoints(workdir, keep=s.train.keep_checkpoints)
  resumed, epoch_sums = _restore(run, checkpoints)
  columns = run.task_eval.columns() if run.task_eval else []
  console.show_table_header(
    resumed, run.prompts is not None, columns, grpo=run.rollouts is not None
  )
  meta_base = {
    "label_map": (
      run.run_data.label_map.to_dict() if run.run_data.label_map else None
    ),
    "base": run_dir.base_record(s),
  }
  t = s.train
  writer = MetricsWriter(workdir, resumed)
  step = int(run.state.step)
  progress = console.Progress(run.total_steps, step)
  ckpt_every = t.checkpoint_every or run.eval_every
  eval_metrics: dict[str, Any] = {}
  predictions: dict[str, list] = {}
  before = (
    run.prompts is not None
    or run.task_eval is not None
    or run.rollouts is not None
  )
  if before and resumed is None:  # before fine-tuning
    zero_shot, _ = evaluate(run)
    writer.write("eval", 0, zero_shot)
    console.eval_line(
      0, run.total_steps, None, zero_shot, columns, note="zero-shot baseline"
    )
    for key, value in zero_shot.items():
      if key in ("answer_accuracy", "pass@1") or "/" in key:
        run.summary.numbers[f"zero_shot_{key}"] = value
  tick, tokens = time.perf_counter(), 0
  compiled, cost, step_times = None, {}, []
  generated = None
  while step < run.total_steps:
    t_batch = time.perf_counter()
    if run.rollouts is not None:  # GRPO: sampled from the current policy
      generated = run.rollouts.batch(
        step, run.state.params, run.frozen, run.train_it
      )
      host_batch = generated.batch
    else:
      host_batch = next(run.train_it)
    tokens += losses.tokens_in(host_batch) * jax.process_count()
    batch = sharding.put_batch(run.mesh, host_batch)
    if compiled is None:
      compiled = run.train_fn.lower(run.state, batch, run.frozen).compile()
      memory = profiling.compiled_memory(compiled)
      cost["train_step_memory_bytes"] = memory["total"]
    t_step = time.perf_counter()
    run.state, metrics = compiled(run.state, batch, run.frozen)
    step += 1
    loss = _check_step(run, metrics, step, checkpoints)
    step_times.append(time.perf_counter() - t_step)
    if generated is not None:
      run.rollouts.timed(generated, time.perf_counter() - t_batch)
    epoch_sums["loss"] += float(metrics["loss"])
    epoch_sums["weight"] += float(metrics["weight"])
    last = step == run.total_steps
    if step % t.log_every == 0 or last:
      tok_s = tokens / max(time.perf_counter() - tick, 1e-9)
      _log_train(run, writer, step, loss, metrics, tok_s)
      note = ""
      if generated is not None:
        note = f"reward {generated.metrics['reward']:.3f}"
      progress.update(step, loss, tok_s, note)
      tick, tokens = time.perf_counter(), 0
    if step % run.eval_every == 0 or last:
      eval_metrics, predictions = evaluate(run)
      train_loss = epoch_sums["loss"] / max(epoch_sums["weight"], 1e-9)
      epoch_sums = {"loss": 0.0, "weight": 0.0}
      writer.write("eval", step, dict(eval_metrics, train_loss=train_loss))
      console.eval_line(
        step, run.total_steps, train_loss, eval_metrics, columns
      )
    if step % ckpt_every == 0 or last:
      meta = dict(
        meta_base, data=run.train_it.state(), step=step, running=epoch_sums
      )
      checkpoints.save(step, run.state, meta)
  progress.close()
  writer.close()
  checkpoints.close()
  if not eval_metrics:  # resumed at the end: evaluate the final state
    eval_metrics, predictions = evaluate(run)
  if step_times:
    cost["step_seconds_median"] = float(np.median(step_times[1:] or step_times))
  cost["peak_rss_bytes"] = profiling.peak_rss_bytes()
  run.summary.numbers.update(cost)
  _finish(run, eval_metrics, predictions)
  return dict(eval_metrics)


def evaluate(run: Loop) -> tuple[dict[str, float], dict[str, list]]:
  """Exact metrics over every eval example, and per-example predictions."""
  if run.rollouts is not None:  # GRPO: greedy completions, pass@1
    metrics, predicted = run.rollouts.evaluate(run.state.params, run.frozen)
    return _with_tasks(run, metrics), predicted
  it = data.EvalIterator(
    run.run_data.eval,
    run.settings.train.batch_size,
    process_index=jax.process_index(),
    process_count=jax.process_count(),
  )
  sums = {"loss": 0.0, "weight": 0.0, "correct": 0.0}
  predicted: dict[str, list] = {}
  for host_batch in it:
    batch = sharding.put_batch(run.mesh, host_batch)
    batch_sums, preds = run.eval_fn(run.state.params, batch, run.frozen)
    for k in batch_sums:
      sums[k] = sums.get(k, 0.0) + float(batch_sums[k])
    keep = _global_rows(batch["weights"]) > 0
    for k, v in preds.items():
      predicted.setdefault(k, []).extend(_global_rows(v)[keep].tolist())
  if run.objective is not None:
    metrics = run.objective.summarize(sums)
  else:
    metrics = losses.summarize(run.task, sums)
  if run.prompts is not None:
    acc, said = answers.evaluate(
      run.model,
      run.state.params,
      run.frozen,
      run.prompts,
      run.run_data.tokenizer,
      run.settings.train.batch_size,
      run.settings.data.max_new_tokens,
    )
    metrics["answer_accuracy"] = acc
    predicted["answers"] = said
  return _with_tasks(run, metrics), predicted


def _with_tasks(run: Loop, metrics: dict[str, float]) -> dict[str, float]:
  """`metrics` and those of the lm-eval tasks (eval.tasks), if any."""
  if run.task_eval is not None:
    metrics.update(
      run.task_eval(
        run.model,
        run.state.params,
        run.frozen,
        run.model_config,
        run.run_data.tokenizer,
      )
    )
  return metrics


def _global_rows(x: jax.Array) -> np.ndarray:
  """Every row of a batch-sharded array, on every process."""
  if jax.process_count() == 1:
    return np.asarray(x)
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def _finish(run: Loop, eval_metrics, predictions) -> None:
  """Curves, predictions and final metrics on disk; the report's end."""
  workdir, task = run.workdir, run.task
  records = read_metrics(workdir / "metrics.jsonl")
  classified = task == CLASSIFICATION and predictions
  if jax.process_index() == 0:
    plot_curves(records, workdir / "curves.png")
    if classified:
      run_dir.write_predictions(
        workdir / "predictions.jsonl", run.run_data, predictions
      )
    run_dir.write_atomic(
      workdir / "final_metrics.json",
      json.dumps({**eval_metrics, **run.summary.numbers}, indent=2),
    )
  if run.rollouts is not None and jax.process_index() == 0:
    run.rollouts.write_predictions(workdir / "predictions.jsonl", predictions)
  shown = run.settings.train.show_predictions
  if classified and shown:
    console.show_predictions(run.run_data, predictions, shown)
  if run.prompts is not None:
    if jax.process_index() == 0:
      run_dir.write_answers(
        workdir / "predictions.jsonl", run.prompts, predictions["answers"]
      )
    if shown:
      console.show_answers(run.prompts, predictions["answers"], shown)
  console.show_final(workdir, task, eval_metrics)
