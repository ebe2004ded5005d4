"""train_and_evaluate: the training loop over any device mesh.

One function runs a whole experiment from its config: the model is loaded
(quantized on load), its trainable tree split off, the train step jitted
once with explicit shardings and donation; evaluation runs at a configured
interval and at the end; checkpoints (trainable state, optimizer, step,
RNG, data position) are saved with orbax and a rerun with the same workdir
resumes exactly where the last checkpoint left off.
"""

import json
import math
import pathlib
import time
from typing import Any

import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from qlora_jax import (
  build,
  data,
  optim,
  profiling,
  report,
  sharding,
  steps,
  tasks,
)
from qlora_jax.checkpoint import Checkpoints
from qlora_jax.metrics import MetricsWriter, Progress, read_metrics
from qlora_jax.plots import plot_curves


class NonFiniteLossError(FloatingPointError):
  """The training loss became NaN or Inf."""


def _init_distributed(config) -> None:
  """jax.distributed for multi-host runs (JAX's usual environment)."""
  dist = config.get("distributed", {})
  if not dist.get("enabled", False):
    return
  if dist.get("cpu_collectives"):
    jax.config.update(
      "jax_cpu_collectives_implementation", dist.cpu_collectives
    )
  kwargs = {}
  for key in ("coordinator_address", "num_processes", "process_id"):
    if dist.get(key) is not None:
      kwargs[key] = dist[key]
  jax.distributed.initialize(**kwargs)
  logging.info("process %d of %d", jax.process_index(), jax.process_count())


def _schedule_numbers(config, steps_per_epoch: int) -> tuple[int, int]:
  t = config.train
  if t.get("steps", 0):
    total = int(t.steps)
  else:
    total = int(t.epochs) * steps_per_epoch
  if total <= 0:
    raise ValueError(
      f"train: {total} steps (train.epochs={t.epochs}, train.steps="
      f"{t.get('steps', 0)}, {steps_per_epoch} steps per epoch)"
    )
  eval_every = int(t.get("eval_every", 0)) or steps_per_epoch
  return total, eval_every


def train_and_evaluate(config, workdir: str) -> dict[str, Any]:
  """Trains and evaluates as `config` says; returns the final eval metrics."""
  _init_distributed(config)
  workdir = pathlib.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  t = config.train
  task = tasks.check_task(config.model.task)
  mesh = sharding.make_mesh(int(config.mesh.data), int(config.mesh.fsdp))
  logging.info("devices: %s; mesh %s", jax.devices(), dict(mesh.shape))
  if jax.process_index() == 0:
    (workdir / "config.json").write_text(config.to_json_best_effort(indent=2))

  loaded = None
  tokenizer = None
  if config.model.checkpoint:
    path = build.resolve_checkpoint(config.model.checkpoint)
    tokenizer = build.load_tokenizer(path)
  run_data = build.make_data(config, tokenizer, workdir)
  num_labels = len(run_data.label_map) if run_data.label_map else None
  loaded = build.load_model(config, num_labels, place=build.place_on(mesh))
  trainable, frozen = build.split_variables(config, loaded.variables)

  global_batch = int(t.batch_size)
  accum = int(t.get("grad_accum", 1))
  if global_batch % (accum * sharding.batch_divisor(mesh)):
    raise ValueError(
      f"train.batch_size {global_batch} must be divisible by train.grad_accum "
      f"({accum}) x the {sharding.batch_divisor(mesh)} batch shards"
    )
  train_it = data.BatchIterator(
    run_data.train,
    global_batch,
    seed=int(t.seed),
    process_index=jax.process_index(),
    process_count=jax.process_count(),
  )
  total_steps, eval_every = _schedule_numbers(config, train_it.steps_per_epoch)
  tx, lr = optim.make_optimizer(config.opt.to_dict(), total_steps)

  state = steps.create_state(trainable, tx, int(t.seed))
  state_sh = sharding.tree_shardings(mesh, state)
  frozen_sh = sharding.tree_shardings(mesh, frozen)
  batch_sh = sharding.batch_sharding(mesh)
  state = jax.device_put(state, state_sh)
  checkpoints = Checkpoints(workdir, keep=int(t.get("keep_checkpoints", 3)))
  epoch_sums = {"loss": 0.0, "weight": 0.0}
  start = checkpoints.latest_step()
  if start is not None:
    state, meta = checkpoints.restore(start, state)
    train_it.restore(meta["data"])
    epoch_sums = dict(meta["running"])
    logging.info("resumed from step %d", start)
  meta_base = {
    "label_map": run_data.label_map.to_dict() if run_data.label_map else None,
    "base": report.base_record(config),
  }
  if run_data.label_map is not None and jax.process_index() == 0:
    run_data.label_map.save(workdir / "labels.json")

  summary = report.pipeline_summary(config, loaded, trainable, frozen)
  report.show(summary)
  train_fn = steps.jit_train_step(
    loaded.model, task, tx, accum, state_sh, batch_sh, frozen_sh
  )
  eval_fn = steps.jit_eval_step(
    loaded.model, task, state_sh.params, batch_sh, frozen_sh
  )
  writer = MetricsWriter(workdir)
  step = int(state.step)
  progress = Progress(total_steps, step)
  log_every = int(t.get("log_every", 10))
  ckpt_every = int(t.get("checkpoint_every", 0)) or eval_every
  eval_metrics: dict[str, Any] = {}
  tick, tokens = time.perf_counter(), 0
  compiled, cost, step_times = None, {}, []
  while step < total_steps:
    host_batch = next(train_it)
    tokens += tasks.tokens_in(host_batch) * jax.process_count()
    batch = sharding.put_batch(mesh, host_batch)
    if compiled is None:
      compiled = train_fn.lower(state, batch, frozen).compile()
      cost["train_step_memory_bytes"] = profiling.compiled_memory(compiled)[
        "total"
      ]
    t_step = time.perf_counter()
    state, metrics = compiled(state, batch, frozen)
    step += 1
    loss_sum = float(metrics["loss"])
    step_times.append(time.perf_counter() - t_step)
    weight = float(metrics["weight"])
    loss = loss_sum / max(weight, 1e-9)
    if not math.isfinite(loss) or not bool(metrics["params_finite"]):
      what = f"loss is {loss}" if not math.isfinite(loss) else "weights are"
      raise NonFiniteLossError(
        f"{what} non-finite at step {step}; the last good checkpoint is step "
        f"{checkpoints.latest_step()} in {checkpoints.directory}"
      )
    epoch_sums["loss"] += loss_sum
    epoch_sums["weight"] += weight
    if step % log_every == 0 or step == total_steps:
      elapsed = time.perf_counter() - tick
      tok_s = tokens / max(elapsed, 1e-9)
      writer.write(
        "train",
        step,
        {
          "loss": loss,
          "accuracy": float(metrics["correct"]) / max(weight, 1e-9),
          "grad_norm": float(metrics["grad_norm"]),
          "update_norm": float(metrics["update_norm"]),
          "learning_rate": float(lr(step - 1)),
          "tokens_per_s": tok_s,
          "epoch": train_it.epoch,
        },
      )
      progress.update(step, loss, tok_s)
      tick, tokens = time.perf_counter(), 0
    if step % eval_every == 0 or step == total_steps:
      eval_metrics, predictions = evaluate(
        eval_fn, state.params, frozen, run_data.eval, mesh, task, global_batch
      )
      train_loss = epoch_sums["loss"] / max(epoch_sums["weight"], 1e-9)
      epoch_sums = {"loss": 0.0, "weight": 0.0}
      writer.write("eval", step, dict(eval_metrics, train_loss=train_loss))
      report.epoch_line(step, total_steps, train_loss, eval_metrics)
    if step % ckpt_every == 0 or step == total_steps:
      meta = dict(
        meta_base, data=train_it.state(), step=step, running=epoch_sums
      )
      checkpoints.save(step, state, meta)
  progress.close()
  writer.close()
  checkpoints.close()
  if not eval_metrics:  # resumed at the end: evaluate the final state
    eval_metrics, predictions = evaluate(
      eval_fn, state.params, frozen, run_data.eval, mesh, task, global_batch
    )
  if step_times:
    cost["step_seconds_median"] = float(np.median(step_times[1:] or step_times))
  cost["peak_rss_bytes"] = profiling.peak_rss_bytes()
  summary.numbers.update(cost)
  return _finish(
    workdir, task, eval_metrics, predictions, run_data, summary, config
  )


def evaluate(eval_fn, params, frozen, arrays, mesh, task, batch_size):
  """Exact metrics over every eval example, and per-example predictions."""
  it = data.EvalIterator(
    arrays,
    batch_size,
    process_index=jax.process_index(),
    process_count=jax.process_count(),
  )
  sums = {"loss": 0.0, "weight": 0.0, "correct": 0.0}
  predicted: dict[str, list] = {}
  for host_batch in it:
    batch = sharding.put_batch(mesh, host_batch)
    batch_sums, preds = eval_fn(params, batch, frozen)
    for k in sums:
      sums[k] += float(batch_sums[k])
    keep = _global_rows(batch["weights"]) > 0
    for k, v in preds.items():
      predicted.setdefault(k, []).extend(_global_rows(v)[keep].tolist())
  return tasks.summarize(task, sums), predicted


def _global_rows(x: jax.Array) -> np.ndarray:
  """Every row of a batch-sharded array, on every process."""
  if jax.process_count() == 1:
    return np.asarray(x)
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def _finish(
  workdir, task, eval_metrics, predictions, run_data, summary, config
):
  records = read_metrics(workdir / "metrics.jsonl")
  if jax.process_index() == 0:
    plot_curves(records, workdir / "curves.png")
    if task == tasks.CLASSIFICATION and predictions:
      report.write_predictions(
        workdir / "predictions.jsonl", run_data, predictions
      )
    (workdir / "final_metrics.json").write_text(
      json.dumps({**eval_metrics, **summary.numbers}, indent=2)
    )
  report.finish(workdir, task, eval_metrics, run_data, predictions, config)
  return dict(eval_metrics)
