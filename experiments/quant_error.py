"""Weight and output error of every data type and bit width on a checkpoint.

python -m experiments.quant_error --workdir DIR \
  [--config configs/table1_dtypes.py] [--checkpoint minilm|FOLDER]
python -m experiments.quant_error --workdir DIR \
  --config configs/table6_perplexity.py [--checkpoint smollm2|FILE.gguf] \
  [--text FILE --text FILE2]

The grid, the number of held-out texts and the table come from the config
(configs/table1_dtypes.py: NF-k, Int-k for k in 2..8, FP4, FP8, with and
without double quantization; NF4 at other block sizes too). Each setting is
written as a point under DIR/points/ like a sweep's, so `python -m
experiments.tables --sweep DIR` renders the table and figures.

A config with `sources` (table 6), or any config with --text, measures
perplexity of held-out text instead (`ablations.perplexity`; decoders
only); it resumes: settings already done under DIR are not run again.
"""

import pathlib

from absl import app, flags
from ml_collections import config_flags

from qlora_jax.ablations import corpora, perplexity, quant_error, sweep
from qlora_jax.engine import cli, setup

_CONFIG = config_flags.DEFINE_config_file(
  "config", "configs/table1_dtypes.py", "Table 1's config file."
)
_CHECKPOINT = flags.DEFINE_string(
  "checkpoint", None, "Checkpoint folder (default: the config's)."
)
_TEXT = flags.DEFINE_multi_string(
  "text",
  None,
  "Text to score (a UTF-8 file or a name of ablations.corpora.SOURCES); "
  "replaces the config's sources and measures perplexity.",
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Output directory.")
flags.mark_flag_as_required("workdir")


def main(argv):
  del argv
  c = _CONFIG.value
  checkpoint = setup.resolve_checkpoint(_CHECKPOINT.value or c.checkpoint)
  out = pathlib.Path(_WORKDIR.value)
  if _TEXT.value or "sources" in c:
    _perplexity(c, checkpoint, out)
    return
  settings = quant_error.grid(
    list(c.data_types),
    list(c.double_quant),
    c.block_size,
    list(c.extra_block_sizes),
  )
  texts = quant_error.sample_texts(c.texts, out / "texts")
  results = quant_error.measure(checkpoint, settings, texts, c.max_length)
  table = sweep.config_module(flags.FLAGS["config"].config_filename).get_table
  for line in quant_error.write_points(out, settings, results, table):
    print(line)


def _perplexity(c, checkpoint, out):
  names = _TEXT.value or list(c.sources)
  sources = dict(corpora.read_source(n) for n in names)
  if len(sources) != len(names):
    raise app.UsageError(f"--text: two sources share a name in {names}")
  if "settings" in c:
    settings = [quant_error.Setting(**dict(s)) for s in c.settings]
  else:
    settings = quant_error.grid(
      list(c.data_types),
      list(c.double_quant),
      c.block_size,
      list(c.extra_block_sizes),
    )
  scoring = perplexity.Scoring(**dict(c.get("scoring", {})))
  table = perplexity.table_spec(list(sources))
  perplexity.run_table(checkpoint, settings, sources, out, table, scoring)


if __name__ == "__main__":
  cli.run(main)
