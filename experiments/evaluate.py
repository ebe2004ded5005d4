"""lm-eval tasks on a finished run (its 4-bit base with unmerged adapters)
or on a checkpoint alone, with lm-eval's own table and JSON.

python -m experiments.evaluate --checkpoint smollm2 \
  --tasks stdlib_docstring_mc --include_path tasks --out results.json
python -m experiments.evaluate --workdir RUN --tasks stdlib_docstring_gen \
  --include_path tasks --num_fewshot 3 --apply_chat_template \
  --limit 40 --out results.json --log_samples

Needs lm-eval (pip install lm-eval==0.4.13, or the `eval` extra); the
tasks in tasks/ read their files relative to the repository root.
"""

from absl import flags

from qlora_jax.engine import cli, tasks
from qlora_jax.harness import evaluate

_WORKDIR = flags.DEFINE_string("workdir", None, "A finished run's workdir.")
_STEP = flags.DEFINE_integer("step", None, "Its checkpoint (default latest).")
_CHECKPOINT = flags.DEFINE_string(
  "checkpoint", None, "A HF folder, a .gguf file or a name ('smollm2')."
)
_QUANT = flags.DEFINE_string(
  "quant", "none", "--checkpoint only: quantize on load ('nf4', ...)."
)
_DTYPE = flags.DEFINE_enum(
  "dtype", "float32", ["float32", "bfloat16"], "--checkpoint only."
)
_TASKS = flags.DEFINE_list("tasks", None, "lm-eval task names.")
_INCLUDE = flags.DEFINE_string("include_path", None, "Folder of task YAMLs.")
_FEWSHOT = flags.DEFINE_integer("num_fewshot", None, "Few-shot examples.")
_LIMIT = flags.DEFINE_float("limit", None, "Documents per task (< 1: share).")
_CHAT = flags.DEFINE_bool(
  "apply_chat_template", False, "Render with the chat template."
)
_BATCH = flags.DEFINE_integer("batch_size", 8, "Rows per model call.")
_MAX_LENGTH = flags.DEFINE_integer(
  "max_length", None, "Context length (default the model's)."
)
_SAMPLES = flags.DEFINE_bool("log_samples", False, "Per-sample logs in --out.")
_OUT = flags.DEFINE_string("out", None, "The results JSON to write.")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace an existing --out.")
flags.mark_flags_as_required(["tasks"])
flags.mark_flags_as_mutual_exclusive(["workdir", "checkpoint"], required=True)


def main(argv):
  del argv
  evaluate.require_lm_eval()
  if _BATCH.value < 1:
    raise ValueError(f"--batch_size must be >= 1, got {_BATCH.value}")
  kept = dict(workdir=_WORKDIR.value, checkpoint=_CHECKPOINT.value)
  if _OUT.value:
    tasks.check_out(_OUT.value, _OVERWRITE.value, **kept)
  if _WORKDIR.value:
    model = tasks.load_run(
      _WORKDIR.value, _STEP.value, _MAX_LENGTH.value, _BATCH.value
    )
  else:
    model = tasks.load_checkpoint(
      _CHECKPOINT.value,
      _QUANT.value,
      _DTYPE.value,
      _MAX_LENGTH.value,
      _BATCH.value,
    )
  limit = _LIMIT.value
  results = evaluate.evaluate(
    model,
    _TASKS.value,
    _INCLUDE.value,
    num_fewshot=_FEWSHOT.value,
    limit=int(limit) if limit is not None and limit >= 1 else limit,
    apply_chat_template=_CHAT.value,
    log_samples=_SAMPLES.value,
  )
  print(evaluate.table(results))
  if _OUT.value:
    tasks.write_results(results, _OUT.value, _OVERWRITE.value, **kept)
    print(f"wrote {_OUT.value}")


if __name__ == "__main__":
  cli.run(main)
