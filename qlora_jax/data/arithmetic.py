"""Single-digit sums with a checkable answer: GRPO's Table 10 task.

Rows `{"messages": [...], "answer": "12"}`: two worked examples as
earlier turns (`SHOTS`, so that the answer is the number alone), then
"What is 6 + 6? Answer with the number only." for every a + b of one-digit
a and b (0..9). SmolLM2-135M-Instruct (NF4 + DQ) answers these and little
else: greedy, 8 of 24 exactly right with the shots (0 of 24 for a
two-digit and a one-digit number); without them 16 of 24 name the right
sum inside "6 + 6 = 12" and none answers with the number alone. The
problems are split by unordered pair {a, b}, so that neither a + b nor
b + a of a held-out question is trained on, and the shots' own sum
(4 + 4) is in neither set: of the 54 other pairs, shuffled with `SEED`,
the first `HELD_OUT_PAIRS` are held out (58 questions) and the rest train
(41). `write` puts them in `tasks/` as JSONL (regenerate with
`python -c "from qlora_jax.data import arithmetic;
arithmetic.write('tasks')"`).

`reward` (`grpo.reward` "qlora_jax.data.arithmetic:reward") gives `EXACT`
for the number alone, `RIGHT_NUMBER` for the right number among other
text ("6 + 6 = 12"), `SOME_NUMBER` for only wrong numbers and 0 for no
number: partial credit makes a group's rewards differ even when none of
its completions is exactly right. pass@1 is the share of exact answers
(`grpo.pass_reward` `EXACT`).
"""

import json
import os
import pathlib
import random
import re

DIGITS = range(10)
SHOTS = (("52", "3"), ("4", "4"))  # worked examples in every prompt
HELD_OUT_PAIRS = 32  # of the 54 unordered pairs: 58 held-out questions
SEED = 0  # the shuffle that splits the pairs
FILES = ("arithmetic_train.jsonl", "arithmetic_heldout.jsonl")

EXACT, RIGHT_NUMBER, SOME_NUMBER = 1.0, 0.5, 0.1
_NUMBER = re.compile(r"-?\d+(?:,\d{3})*")


def ask(a: int | str, b: int | str) -> str:
  """The question a + b."""
  return f"What is {a} + {b}? Answer with the number only."


def question(a: int, b: int) -> dict:
  """The row asking a + b after the worked examples."""
  messages = []
  for x, y in SHOTS:
    messages.append({"role": "user", "content": ask(x, y)})
    messages.append({"role": "assistant", "content": str(int(x) + int(y))})
  messages.append({"role": "user", "content": ask(a, b)})
  return {"messages": messages, "answer": str(a + b)}


def splits() -> tuple[list[dict], list[dict]]:
  """(train, held-out) rows: questions of disjoint sets of pairs {a, b}."""
  shown = {tuple(sorted(int(v) for v in shot)) for shot in SHOTS}
  pairs = [(a, b) for a in DIGITS for b in DIGITS if a <= b]
  pairs = [p for p in pairs if p not in shown]
  random.Random(SEED).shuffle(pairs)

  def rows(chosen):
    ordered = {(a, b) for a, b in chosen} | {(b, a) for a, b in chosen}
    return [question(a, b) for a, b in sorted(ordered)]

  return rows(pairs[HELD_OUT_PAIRS:]), rows(pairs[:HELD_OUT_PAIRS])


def write(folder: str | os.PathLike) -> list[pathlib.Path]:
  """Writes `FILES` (train, held-out) into `folder`."""
  paths = []
  for name, rows in zip(FILES, splits(), strict=True):
    path = pathlib.Path(folder, name)
    text = "".join(json.dumps(r) + "\n" for r in rows)
    path.write_text(text, encoding="utf-8")
    paths.append(path)
  return paths


def reward(prompt: str, completion: str, row: dict) -> float:
  """`EXACT` for the number alone (surrounding whitespace and a final
  full stop allowed), `RIGHT_NUMBER` for the right number among other
  text, `SOME_NUMBER` for only wrong numbers, 0 for none."""
  del prompt
  answer = int(row["answer"])
  said = completion.strip().removesuffix(".").strip()
  if _NUMBER.fullmatch(said) and int(said.replace(",", "")) == answer:
    return EXACT
  numbers = [int(n.replace(",", "")) for n in _NUMBER.findall(completion)]
  if answer in numbers:
    return RIGHT_NUMBER
  return SOME_NUMBER if numbers else 0.0
