"""Perplexity of held-out text after post-training quantization (table 6).

Every linear layer of a decoder (output head excluded: a tied head is the
embedding) is quantized with each setting, and the model scores real text:
- each source is tokenized once into one stream (no special tokens added)
  and cut into `window`-token non-overlapping windows, as many as give at
  least `tokens` scored tokens; in each window every token but the first
  is predicted from the ones before it;
- perplexity = exp(mean negative log-likelihood over the scored tokens);
- KL(float || quantized) of the next-token distributions, and top-1
  agreement, over the first `kl_tokens` scored tokens of each source (the
  float model's log-probabilities for those are held in memory).

Each finished setting is written as a sweep point at once, so a killed
run resumes with the settings not yet done.
"""

import dataclasses
import hashlib
import json
import math
import pathlib
import platform
from collections.abc import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from qlora_jax import models, quant
from qlora_jax.ablations import quant_error, sweep
from qlora_jax.ablations.results import DONE
from qlora_jax.engine import setup

FLOAT = "float"  # the row of the model as loaded, nothing re-quantized


@dataclasses.dataclass(frozen=True)
class Scoring:
  """How much of each source is scored. Window counts are rounded up to
  a multiple of `batch` (one compiled shape per model)."""

  window: int = 512  # tokens per window (the first is context only)
  tokens: int = 32_768  # at least this many scored tokens per source
  kl_tokens: int = 8_192  # KL and top-1 over the first (at least) this many
  batch: int = 4  # windows per forward pass

  def __post_init__(self):
    for f in dataclasses.fields(self):
      v = getattr(self, f.name)
      if not isinstance(v, int) or v < (2 if f.name == "window" else 1):
        raise ValueError(f"scoring.{f.name}: {v!r} is not a positive int")

  def _round(self, tokens: int) -> int:
    windows = math.ceil(tokens / (self.window - 1))
    return self.batch * math.ceil(windows / self.batch)

  @property
  def windows(self) -> int:
    return self._round(self.tokens)

  @property
  def kl_windows(self) -> int:
    return min(self.windows, self._round(self.kl_tokens))


def token_windows(tokenizer, text: str, name: str, s: Scoring) -> np.ndarray:
  """int32 [s.windows, s.window]: the first windows of `text`'s tokens
  (no special tokens added).

  Raises:
    ValueError: the text has too few tokens, naming the source.
  """
  ids = tokenizer.encode_batch([text], add_special_tokens=False)[0]
  need = s.windows * s.window
  if len(ids) < need:
    raise ValueError(
      f"text source {name!r}: {len(ids):,} tokens, {need:,} needed for "
      f"{s.windows} windows of {s.window} (scoring.tokens {s.tokens:,})"
    )
  return np.asarray(ids[:need], np.int32).reshape(s.windows, s.window)


def scores(logits, ids, ref_logp, has_ref):
  """Sums over a batch of windows: the NLL of every next token; KL of the
  reference log-probs from these and top-1 agreement, counted when
  `has_ref` (0 or 1). Also returns the log-probs [b, t - 1, vocab]."""
  logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), -1)
  target = ids[:, 1:]
  nll = -jnp.take_along_axis(logp, target[..., None], -1)[..., 0]
  kl = jnp.sum(jnp.exp(ref_logp) * (ref_logp - logp), -1)
  agree = jnp.argmax(ref_logp, -1) == jnp.argmax(logp, -1)
  sums = {
    "nll": jnp.sum(nll),
    "kl": has_ref * jnp.sum(kl),
    "agree": has_ref * jnp.sum(agree.astype(jnp.float32)),
  }
  return sums, logp


class Scorer:
  """Scores windows with a model: one compile per model, batch shape and
  whether log-probs are returned."""

  def __init__(self, vocab: int):
    self.vocab = vocab

    def run(model, variables, ids, ref_logp, has_ref, want_logp):
      logits = model.apply(variables, ids, jnp.ones_like(ids))
      sums, logp = scores(logits, ids, ref_logp, has_ref)
      return sums, (logp if want_logp else None)

    self._run = jax.jit(run, static_argnums=(0, 5))

  def score(self, model, variables, windows, s: Scoring, ref=None, keep=0):
    """(totals {"nll", "count", "kl", "agree", "kl_count"}, log-probs of
    the first `keep` windows or None). `ref`: reference log-probs of the
    first windows [k, window - 1, vocab] (KL and agreement over those)."""
    totals = dict.fromkeys(("nll", "count", "kl", "agree"), 0.0)
    totals["kl_count"] = 0
    kept = []
    b, t = s.batch, windows.shape[1] - 1
    zeros = None
    for i in range(0, len(windows), b):
      ids = jnp.asarray(windows[i : i + b])
      has_ref = ref is not None and i < len(ref)
      if has_ref:
        r = jnp.asarray(ref[i : i + b])
      else:
        if zeros is None:
          zeros = jnp.zeros((b, t, self.vocab), jnp.float32)
        r = zeros
      sums, logp = self._run(
        model, variables, ids, r, jnp.float32(has_ref), i < keep
      )
      totals["nll"] += float(sums["nll"])
      totals["count"] += ids.shape[0] * t
      if has_ref:
        totals["kl"] += float(sums["kl"])
        totals["agree"] += float(sums["agree"])
        totals["kl_count"] += ids.shape[0] * t
      if logp is not None:
        kept.append(np.asarray(logp))
    logp = np.concatenate(kept)[:keep] if kept else None
    return totals, logp


def _metrics(per_source: Mapping[str, dict]) -> dict[str, float]:
  out = {}
  for name, t in per_source.items():
    out[f"perplexity_{name}"] = math.exp(t["nll"] / t["count"])
    out[f"nll_{name}"] = t["nll"] / t["count"]
    out[f"scored_tokens_{name}"] = t["count"]
    if t["kl_count"]:
      out[f"kl_{name}"] = t["kl"] / t["kl_count"]
      out[f"top1_agreement_{name}"] = t["agree"] / t["kl_count"]
  return out


def labels(s: quant_error.Setting | None) -> dict:
  if s is None:
    return {
      "family": "float",
      "data type": FLOAT,
      "double quant": False,
      "block": 0,
    }
  return {
    "family": quant_error.family(s.data_type),
    "data type": s.data_type,
    "double quant": s.double_quant,
    "block": s.block_size,
  }


SETUP = "setup.json"


def _size(path: pathlib.Path) -> int:
  if path.is_file():
    return path.stat().st_size
  return sum(p.stat().st_size for p in path.iterdir() if p.is_file())


def _check_setup(out, path, scoring: Scoring, windows: Mapping) -> None:
  """Records what the points are measured on; refuses to add points to a
  folder measured on another checkpoint, scoring or text."""
  setup_now = {
    # Name and size, not the path: the record holds nothing of a machine.
    "checkpoint": pathlib.Path(path).name,
    "checkpoint_bytes": _size(pathlib.Path(path)),
    "scoring": dataclasses.asdict(scoring),
    "sources": {
      n: hashlib.sha256(w.tobytes()).hexdigest()[:16]
      for n, w in windows.items()
    },
    "python": platform.python_version(),
  }
  file = pathlib.Path(out) / SETUP
  if file.exists():
    before = json.loads(file.read_text())
    diff = sorted(k for k in setup_now if before.get(k) != setup_now[k])
    if diff:
      raise ValueError(
        f"{out} holds points measured with other {', '.join(diff)} "
        f"({file}); use another --workdir"
      )
    return
  pathlib.Path(out).mkdir(parents=True, exist_ok=True)
  file.write_text(json.dumps(setup_now, indent=2))


def run_table(
  checkpoint: str | pathlib.Path,
  settings: Sequence[quant_error.Setting],
  sources: Mapping[str, str],
  out: str | pathlib.Path,
  table: Mapping,
  scoring: Scoring = Scoring(),
  echo: Callable[[str], None] = print,
) -> dict[str, dict]:
  """Writes the float row and one point per setting under `out`/points
  (skipping points already done); returns {point slug: metrics}.

  `sources` maps a label to its text. The float row is the checkpoint as
  loaded (for a GGUF file: its stored weights dequantized to float32).
  """
  out = pathlib.Path(out)
  path = setup.resolve_checkpoint(str(checkpoint))
  tokenizer = setup.load_tokenizer(path)
  if tokenizer is None:
    raise ValueError(f"{path}: no tokenizer to score text with")
  config = models.checkpoint_config(path)
  if isinstance(config, models.BertConfig):
    raise ValueError(f"{path}: perplexity needs a decoder, not an encoder")
  spec = models.ModelSpec(config, "causal_lm")
  windows = {
    n: token_windows(tokenizer, t, n, scoring) for n, t in sources.items()
  }
  _check_setup(out, path, scoring, windows)
  points = [sweep.Point(labels(None), {})]
  points += [sweep.Point(labels(s), {}) for s in settings]
  sweep.write_layout(out, points, table)
  base = models.from_pretrained(path, task="causal_lm")
  scorer = Scorer(config.vocab_size)
  k = scoring.kl_windows
  ref, float_totals = {}, {}
  for n, w in windows.items():  # the float model: reference log-probs
    float_totals[n], ref[n] = scorer.score(
      base.model, base.variables, w, scoring, keep=k
    )
  results = {}
  float_metrics = _metrics(float_totals)
  weights = {
    p: w
    for p, w in quant_error.linear_weights(base.variables).items()
    if p not in spec.heads
  }
  n_weights = sum(int(w.size) for w in weights.values())
  float_metrics.update(
    bits_per_param=8.0 * np.dtype(next(iter(weights.values())).dtype).itemsize,
    weight_relative_error=0.0,
    quantized_params=n_weights,
  )
  rows = [(points[0], None)] + list(zip(points[1:], settings, strict=True))
  for point, s in rows:
    workdir = out / "points" / point.slug
    if (workdir / DONE).exists():
      results[point.slug] = json.loads((workdir / DONE).read_text())
      echo(f"{point.slug}: done before")
      continue
    if s is None:
      metrics = dict(float_metrics)
      for n in windows:  # against itself: exactly 0 and 1 by construction
        metrics[f"kl_{n}"], metrics[f"top1_agreement_{n}"] = 0.0, 1.0
    else:
      wm, quantized = quant_error.weight_errors(weights, s)
      model, variables = quant_error.quantized_model(
        spec, base.variables, quantized, s
      )
      totals = {
        n: scorer.score(model, variables, w, scoring, ref=ref[n])[0]
        for n, w in windows.items()
      }
      metrics = _metrics(totals)
      metrics["bits_per_param"] = wm["bits_per_param"]
      metrics["weight_relative_error"] = wm["weight_relative_error"]
      metrics["quantized_params"] = n_weights
      metrics["bits"] = quant.get_data_type(s.data_type).bits
      del model, variables, quantized
    sweep.write_point(workdir, point)
    (workdir / DONE).write_text(json.dumps(metrics, indent=2))
    results[point.slug] = metrics
    ppl = ", ".join(f"{n} {metrics[f'perplexity_{n}']:.3f}" for n in windows)
    echo(f"{point.slug}: {metrics['bits_per_param']:.3f} bits/param, ppl {ppl}")
  return results


def table_spec(sources: Sequence[str]) -> dict:
  """The table and figures of a perplexity run over `sources`."""
  if not sources:
    raise ValueError("a perplexity table needs at least one text source")
  metrics = [
    ["bits_per_param", "bits/param", "bits"],
    ["weight_relative_error", "rel. weight err.", "f4"],
  ]
  metrics += [[f"perplexity_{n}", f"ppl {n}", "f3"] for n in sources]
  metrics += [[f"kl_{n}", f"KL {n}", "sci"] for n in sources]
  metrics += [[f"top1_agreement_{n}", f"top-1 {n}", "pct"] for n in sources]
  figures = [
    {
      "kind": "xy",
      "file": f"perplexity_{n}_vs_bits.png",
      "x": "bits_per_param",
      "y": f"perplexity_{n}",
      "series": "family",
      "logy": True,
    }
    for n in sources
  ]
  figures.append(
    {
      "kind": "xy",
      "file": "kl_vs_bits.png",
      "x": "bits_per_param",
      "y": f"kl_{sources[0]}",
      "series": "family",
      "logy": True,
    }
  )
  return {
    "title": "Data types by perplexity: post-training quantization of "
    "every linear layer",
    "rows": ["family", "data type", "double quant", "block"],
    "metrics": metrics,
    "figures": figures,
  }
