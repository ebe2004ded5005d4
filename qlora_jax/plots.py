"""PNG figures of a run's curves (matplotlib, no display)."""

import pathlib

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def plot_curves(records: list[dict], path: str | pathlib.Path) -> None:
  """Train loss per logged step, eval loss and the eval metric per eval."""
  train = [r for r in records if r["kind"] == "train"]
  evals = [r for r in records if r["kind"] == "eval"]
  metric = next(
    (k for k in ("accuracy", "perplexity") if evals and k in evals[0]), None
  )
  fig, axes = plt.subplots(1, 2 if metric else 1, figsize=(10, 4))
  axes = axes if metric else [axes]
  ax = axes[0]
  ax.plot([r["step"] for r in train], [r["loss"] for r in train], label="train")
  if evals:
    ax.plot(
      [r["step"] for r in evals],
      [r["loss"] for r in evals],
      "o-",
      label="eval",
    )
  ax.set_xlabel("step")
  ax.set_ylabel("loss")
  ax.legend()
  if metric:
    ax = axes[1]
    ax.plot([r["step"] for r in evals], [r[metric] for r in evals], "o-")
    ax.set_xlabel("step")
    ax.set_ylabel(f"eval {metric}")
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)
