"""The English conversations of the chatterbot corpus, vendored as JSONL.

`corpora/chatterbot_english.jsonl` holds the 2,026 conversations of the 21
English YAML files of the `chatterbot-corpus` 1.3.3 wheel (BSD-3-Clause,
Gunther Cox; the license is `corpora/chatterbot-corpus-LICENSE.md`), one
row per conversation in file order: {"id": "<file>/<index>", "topic",
"messages"}, the turns alternating user / assistant from the first, as
ChatterBot's trainers read them (each statement answers the one before).
Cleaning: turns are stripped; numbers YAML read as numbers are their
text; trivia.yml's one entry written as a single string ("<question>? -
'<answer>'") is split into its two turns. Nothing else is changed.

Regenerate with
`pip download --no-deps chatterbot-corpus==1.3.3 -d DIR` and
`write_jsonl("DIR/chatterbot_corpus-1.3.3-py2.py3-none-any.whl")`.

`split` assigns conversations to train / held-out by a SHA-256 of their
source id, the first user turn lower-cased with its spaces collapsed, so
that conversations opening with the same question never straddle it.
"""

import hashlib
import json
import pathlib
import re
import zipfile

import yaml

VENDORED = (
  pathlib.Path(__file__).parent / "corpora" / "chatterbot_english.jsonl"
)
ENGLISH = "chatterbot_corpus/data/english/"
# trivia.yml's entry written as one string: "<question>? - '<answer>'".
_ONE_STRING = re.compile(r"^(?P<q>.+\?) - '(?P<a>[^']+)'$")


def conversations(yaml_text: str, where: str) -> list[list[str]]:
  """The turns of each conversation of one chatterbot YAML file.

  Raises:
    ValueError: naming `where` and the entry: not YAML, no
      `conversations` list, or an entry that is not a list of text.
  """
  try:
    doc = yaml.safe_load(yaml_text)
  except yaml.YAMLError as e:
    raise ValueError(f"{where}: not YAML: {e}") from e
  convs = doc.get("conversations") if isinstance(doc, dict) else None
  if not isinstance(convs, list):
    raise ValueError(f"{where}: no 'conversations' list")
  out = []
  for i, turns in enumerate(convs):
    if isinstance(turns, str) and _ONE_STRING.match(turns):
      m = _ONE_STRING.match(turns)
      turns = [m["q"], m["a"]]
    if not isinstance(turns, list) or not all(
      isinstance(t, (str, int, float)) for t in turns
    ):
      raise ValueError(f"{where}: conversations[{i}] is not a list of text")
    turns = [str(t).strip() for t in turns]
    if len(turns) < 2 or not all(turns):
      raise ValueError(f"{where}: conversations[{i}] has an empty turn")
    out.append(turns)
  return out


def rows_from_wheel(wheel: str | pathlib.Path) -> list[dict]:
  """The rows of `VENDORED`, read from the wheel's English YAML files."""
  rows = []
  with zipfile.ZipFile(wheel) as z:
    names = sorted(
      n for n in z.namelist() if n.startswith(ENGLISH) and n.endswith(".yml")
    )
    if not names:
      raise ValueError(f"{wheel} holds no {ENGLISH}*.yml")
    for name in names:
      text = z.read(name).decode("utf-8")
      topic = yaml.safe_load(text)["categories"][0]
      stem = pathlib.PurePosixPath(name).stem
      for i, turns in enumerate(conversations(text, f"{wheel}:{name}")):
        roles = ("user", "assistant")
        messages = [
          {"role": roles[k % 2], "content": t} for k, t in enumerate(turns)
        ]
        rows.append({"id": f"{stem}/{i}", "topic": topic, "messages": messages})
  return rows


def write_jsonl(wheel: str | pathlib.Path, out: str | pathlib.Path = VENDORED):
  """Writes the rows of `wheel` as JSONL (`VENDORED` by default)."""
  with open(out, "w", encoding="utf-8") as f:
    for row in rows_from_wheel(wheel):
      f.write(json.dumps(row, ensure_ascii=False) + "\n")


def read(path: str | pathlib.Path = VENDORED) -> list[dict]:
  """The vendored conversations (rows as `rows_from_wheel` gives them)."""
  rows = []
  with open(path, encoding="utf-8") as f:
    for line_no, line in enumerate(f, 1):
      try:
        rows.append(json.loads(line))
      except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{line_no}: not JSON: {e}") from e
  return rows


def source_id(row: dict) -> str:
  """What conversations share when they ask the same: the first turn,
  lower-cased, its spaces collapsed."""
  return " ".join(row["messages"][0]["content"].lower().split())


def hash_fraction(text: str) -> float:
  """A SHA-256 of `text` as a number in [0, 1)."""
  digest = hashlib.sha256(text.encode("utf-8")).digest()
  return int.from_bytes(digest[:8], "big") / 2.0**64
