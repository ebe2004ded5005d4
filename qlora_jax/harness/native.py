"""Local multiple-choice tasks scored without lm-eval installed.

A run that evaluates lm-eval tasks while it trains (`eval.tasks`) uses
lm-eval itself when it is installed. Without it, a zero-shot
`multiple_choice` task whose YAML reads a local JSON file (the kind
`tasks/` ships) runs here, with lm-eval 0.4.13's semantics
(`ConfigurableTask`): `doc_to_text` / `doc_to_target` a field of the
document or a Jinja template (StrictUndefined, trailing newline kept; a
number read as an index), `doc_to_choice` a list, a field or a template
of a list; one request (context, target_delimiter + choice) per choice,
the delimiter "" under a chat template; `acc` the argmax of the
log-likelihoods, `acc_norm` the argmax of the log-likelihoods over each
choice's length in characters, each with the standard error of the mean.
`tests/harness_peers_test.py` checks the numbers equal lm-eval's.

Anything else (few-shot examples, groups, filters, `!function` hooks,
other output types, other metrics) needs lm-eval: `load` raises
`Unsupported` naming the task and the field.
"""

import ast
import dataclasses
import json
import math
import pathlib
from collections.abc import Sequence
from typing import Any

import jinja2
import numpy as np
import yaml

from qlora_jax.harness.lm import TextModel

METRICS = ("acc", "acc_norm")
# YAML keys a natively run task may use (others change what lm-eval does).
KNOWN = {
  "task",
  "tag",
  "dataset_path",
  "dataset_kwargs",
  "dataset_name",
  "output_type",
  "training_split",
  "validation_split",
  "fewshot_split",
  "test_split",
  "doc_to_text",
  "doc_to_choice",
  "doc_to_target",
  "target_delimiter",
  "fewshot_delimiter",
  "metric_list",
  "metadata",
  "num_fewshot",
}

_ENV = jinja2.Environment(
  loader=jinja2.BaseLoader(),
  undefined=jinja2.StrictUndefined,
  keep_trailing_newline=True,
)


class Unsupported(ValueError):
  """A task this module cannot run the way lm-eval would."""


class _Loader(yaml.SafeLoader):
  """YAML with lm-eval's `!function` tags read as markers, not code."""


_Loader.add_multi_constructor("!", lambda loader, tag, node: {"__tag__": tag})


@dataclasses.dataclass(frozen=True)
class LocalTask:
  """A multiple-choice task's documents and fields, read from its YAML."""

  name: str
  source: pathlib.Path
  docs: list[dict]
  doc_to_text: str
  doc_to_choice: Any
  doc_to_target: Any
  target_delimiter: str
  metrics: tuple[str, ...]
  features: frozenset[str] = frozenset()  # the documents' fields

  def text(self, doc: dict) -> str:
    if self.doc_to_text in self.features:
      return doc[self.doc_to_text]
    return _ENV.from_string(self.doc_to_text).render(**doc)

  def choices(self, doc: dict) -> list[str]:
    c = self.doc_to_choice
    if isinstance(c, list):
      return [str(x) for x in c]
    if isinstance(c, dict):
      return [str(x) for x in c.values()]
    if c in self.features:
      return list(doc[c])
    return list(ast.literal_eval(_ENV.from_string(c).render(**doc)))

  def gold(self, doc: dict) -> int:
    """The index of the right choice (-1 when it names none)."""
    t = self.doc_to_target
    if isinstance(t, str):
      if t in self.features:
        t = doc[t]
      else:
        t = _ENV.from_string(t).render(**doc)
        t = ast.literal_eval(t) if t.isdigit() else t
    choices = self.choices(doc)
    if isinstance(t, str):
      return choices.index(t) if t in choices else -1
    if isinstance(t, int) and not isinstance(t, bool) and t < len(choices):
      return t
    return -1


def _task_files(include_path: str | pathlib.Path) -> dict[str, pathlib.Path]:
  found = {}
  for path in sorted(pathlib.Path(include_path).rglob("*.yaml")):
    try:
      config = yaml.load(path.read_text(encoding="utf-8"), _Loader)
    except yaml.YAMLError:
      continue
    if isinstance(config, dict) and isinstance(config.get("task"), str):
      found.setdefault(config["task"], path)
  return found


def _unsupported(name: str, source, why: str) -> Unsupported:
  return Unsupported(f"task {name!r} ({source}): {why}; only lm-eval runs it")


def _tagged(value) -> bool:
  if isinstance(value, dict):
    return "__tag__" in value or any(_tagged(v) for v in value.values())
  if isinstance(value, list):
    return any(_tagged(v) for v in value)
  return False


def first_metric(name: str, include_path: str | pathlib.Path | None) -> str:
  """The first metric of task `name`'s YAML under `include_path` (any task
  lm-eval runs, natively runnable or not)."""
  source = _task_files(include_path).get(name) if include_path else None
  if source is None:
    raise Unsupported(f"task {name!r}: no YAML under {include_path} names it")
  config = yaml.load(source.read_text(encoding="utf-8"), _Loader)
  metrics = config.get("metric_list") or []
  if not metrics or not isinstance(metrics[0], dict):
    raise Unsupported(f"task {name!r} ({source}): no metric_list")
  return str(metrics[0].get("metric"))


def load(name: str, include_path: str | pathlib.Path | None) -> LocalTask:
  """Task `name` from the YAML files under `include_path`.

  Raises:
    Unsupported: no such task there, or one lm-eval alone runs.
  """
  if not include_path:
    raise Unsupported(f"task {name!r}: no include_path to find it in")
  files = _task_files(include_path)
  if name not in files:
    raise Unsupported(f"task {name!r}: no YAML under {include_path} names it")
  source = files[name]
  config = yaml.load(source.read_text(encoding="utf-8"), _Loader)
  for key in sorted(config):
    if key not in KNOWN:
      raise _unsupported(name, source, f"field {key!r}")
    if _tagged(config[key]):
      raise _unsupported(name, source, f"{key!r} is Python code")
  if config.get("output_type") != "multiple_choice":
    raise _unsupported(
      name, source, f"output_type {config.get('output_type')!r}"
    )
  if config.get("num_fewshot", 0):
    raise _unsupported(name, source, "num_fewshot > 0")
  if config.get("dataset_path") != "json" or config.get("dataset_name"):
    raise _unsupported(name, source, "a dataset other than local JSON")
  metrics = tuple(m["metric"] for m in config.get("metric_list", []))
  if not metrics or any(m not in METRICS for m in metrics):
    raise _unsupported(name, source, f"metrics {list(metrics)}")
  split = config.get("test_split") or config.get("validation_split")
  files = (config.get("dataset_kwargs") or {}).get("data_files") or {}
  if not split or not isinstance(files, dict) or split not in files:
    raise _unsupported(name, source, f"no data file for split {split!r}")
  data = files[split]
  if not isinstance(data, str):
    raise _unsupported(name, source, "several files for one split")
  docs = _read_jsonl(pathlib.Path(data))
  return LocalTask(
    name=name,
    source=source,
    docs=docs,
    doc_to_text=config["doc_to_text"],
    doc_to_choice=config["doc_to_choice"],
    doc_to_target=config["doc_to_target"],
    target_delimiter=config.get("target_delimiter", " "),
    metrics=metrics,
    features=frozenset(k for d in docs for k in d),
  )


def _read_jsonl(path: pathlib.Path) -> list[dict]:
  docs = []
  with open(path, encoding="utf-8") as f:
    for line_no, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        docs.append(json.loads(line))
      except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{line_no}: not JSON: {e}") from e
  return docs


def _stderr(values: Sequence[float]) -> float:
  """lm-eval's `mean_stderr`: the sample standard deviation over sqrt(n)."""
  n = len(values)
  if n < 2:
    return float("nan")
  mu = sum(values) / n
  return math.sqrt(sum((x - mu) ** 2 for x in values) / (n - 1) / n)


def evaluate(
  model: TextModel,
  task: LocalTask,
  limit: int | None = None,
  apply_chat_template: bool = False,
) -> dict[str, float]:
  """{metric: value, metric_stderr: value} over the first `limit` docs."""
  docs = task.docs[:limit] if limit else task.docs
  delimiter = "" if apply_chat_template else task.target_delimiter
  pairs, spans = [], []
  for doc in docs:
    context = task.text(doc)
    if apply_chat_template:
      messages = [{"role": "user", "content": context}]
      context = model.apply_chat_template(messages, True)
    choices = task.choices(doc)
    spans.append((len(pairs), choices))
    pairs += [(context, delimiter + c) for c in choices]
  scores = [ll for ll, _ in model.loglikelihood(pairs)]
  per_doc: dict[str, list[float]] = {m: [] for m in task.metrics}
  for doc, (start, choices) in zip(docs, spans, strict=True):
    lls = np.array(scores[start : start + len(choices)])
    lengths = np.array([float(len(c)) for c in choices])
    gold = task.gold(doc)
    picked = {
      "acc": int(np.argmax(lls)),
      "acc_norm": int(np.argmax(lls / lengths)),
    }
    for m in task.metrics:
      per_doc[m].append(1.0 if picked[m] == gold else 0.0)
  out = {}
  for m, values in per_doc.items():
    out[m] = sum(values) / len(values)
    out[f"{m}_stderr"] = _stderr(values)
  return out
