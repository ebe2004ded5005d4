"""RougeL for tasks/stdlib_summary_gen.yaml, without the rouge_score
package: the F-measure of the longest common subsequence of the two
texts' tokens, each text lower-cased and cut into runs of [a-z0-9] (as
rouge_score's default tokenizer, no stemming)."""

import re


def tokens(text: str) -> list[str]:
  return re.findall(r"[a-z0-9]+", text.lower())


def _lcs(a: list[str], b: list[str]) -> int:
  """Length of the longest common subsequence (one row of the table)."""
  row = [0] * (len(b) + 1)
  for x in a:
    diagonal = 0  # the previous row's value left of column j
    for j, y in enumerate(b, 1):
      above = row[j]
      row[j] = diagonal + 1 if x == y else max(above, row[j - 1])
      diagonal = above
  return row[-1]


def rouge_l(prediction: str, reference: str) -> float:
  """RougeL F-measure of `prediction` against `reference`, in [0, 1]."""
  p, r = tokens(prediction), tokens(reference)
  common = _lcs(p, r)
  if not common:
    return 0.0
  precision, recall = common / len(p), common / len(r)
  return 2 * precision * recall / (precision + recall)


def process_results(doc: dict, results: list[str]) -> dict[str, float]:
  return {"rougeL": rouge_l(results[0], doc["summary"])}
