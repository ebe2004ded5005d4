"""Table 6, data types by perplexity on the real SmolLM2-135M-Instruct.

python -m experiments.quant_error --config configs/table6_perplexity.py --workdir results/table6
python -m experiments.tables --sweep results/table6

The QLoRA paper's Table 2 (Int4 34.34 > FP4 31.07 > NF4 + DQ 27.41 on the
Pile) on a real decoder: every linear layer of SmolLM2 quantized after
training with each setting below, then the perplexity of held-out code and
English (`ablations.corpora`), and the KL divergence of the next-token
distributions from the float model's. "float" is the shipped GGUF file's
Q4_1 weights dequantized to float32, the model every row quantizes again.
"""

from ml_collections import config_dict

WIDTHS = (2, 3, 4, 5, 6, 8)


def _setting(data_type: str, block: int = 64, dq: bool = False) -> dict:
  return {"data_type": data_type, "block_size": block, "double_quant": dq}


def get_config() -> config_dict.ConfigDict:
  c = config_dict.ConfigDict()
  c.checkpoint = "smollm2"  # a .gguf file, a Hugging Face folder, or a name
  # Named sources (ablations.corpora.SOURCES) or UTF-8 text files.
  c.sources = ["stdlib_source", "chatterbot_english"]
  c.scoring = config_dict.ConfigDict(
    {"window": 512, "tokens": 32_768, "kl_tokens": 8_192, "batch": 4}
  )
  c.settings = (
    [_setting(f"int{k}") for k in WIDTHS]
    + [_setting("fp4")]
    + [_setting(f"nf{k}") for k in WIDTHS]
    + [_setting("nf4", 64, True)]
    + [_setting("nf4", b, True) for b in (32, 128, 256)]
  )
  return c
