"""Build the shipped quickstart prompt set (data/quickstart) from chatterbot-corpus 1.3.3.

The corpus (BSD-3-Clause, by Gunther Cox) is a set of YAML files of short conversations.
From each English conversation we take the first utterance as the `prompt` and the second,
if any, as the `reference`; `category` is the YAML file's stem and `language` is "en".
Prompts are deduplicated (strip + casefold, first reference kept), and empty prompts or
prompts over 300 characters are dropped. About 12% go to eval, chosen by a hash of the
prompt so the split does not depend on file order; each split is shuffled with a fixed seed.

Usage:
    python scripts/build_quickstart_data.py                    # downloads the wheel with pip
    python scripts/build_quickstart_data.py --corpus-dir DIR   # DIR holds the english/*.yml
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import yaml

CORPUS = "chatterbot-corpus==1.3.3"
MAX_PROMPT_CHARS = 300
EVAL_PERCENT = 12
REPO_ROOT = Path(__file__).resolve().parent.parent
COMMAND = "python scripts/build_quickstart_data.py"

LICENSE = """\
The prompts and references in train.jsonl and eval.jsonl are taken from
chatterbot-corpus 1.3.3 (https://github.com/gunthercox/chatterbot-corpus),
distributed under the BSD 3-Clause License:

Copyright (c) 2016, Gunther Cox
All rights reserved.

Redistribution and use in source and binary forms, with or without
modification, are permitted provided that the following conditions are met:

1. Redistributions of source code must retain the above copyright notice, this
   list of conditions and the following disclaimer.

2. Redistributions in binary form must reproduce the above copyright notice,
   this list of conditions and the following disclaimer in the documentation
   and/or other materials provided with the distribution.

3. Neither the name of the copyright holder nor the names of its
   contributors may be used to endorse or promote products derived from
   this software without specific prior written permission.

THIS SOFTWARE IS PROVIDED BY THE COPYRIGHT HOLDERS AND CONTRIBUTORS "AS IS"
AND ANY EXPRESS OR IMPLIED WARRANTIES, INCLUDING, BUT NOT LIMITED TO, THE
IMPLIED WARRANTIES OF MERCHANTABILITY AND FITNESS FOR A PARTICULAR PURPOSE ARE
DISCLAIMED. IN NO EVENT SHALL THE COPYRIGHT HOLDER OR CONTRIBUTORS BE LIABLE
FOR ANY DIRECT, INDIRECT, INCIDENTAL, SPECIAL, EXEMPLARY, OR CONSEQUENTIAL
DAMAGES (INCLUDING, BUT NOT LIMITED TO, PROCUREMENT OF SUBSTITUTE GOODS OR
SERVICES; LOSS OF USE, DATA, OR PROFITS; OR BUSINESS INTERRUPTION) HOWEVER
CAUSED AND ON ANY THEORY OF LIABILITY, WHETHER IN CONTRACT, STRICT LIABILITY,
OR TORT (INCLUDING NEGLIGENCE OR OTHERWISE) ARISING IN ANY WAY OUT OF THE USE
OF THIS SOFTWARE, EVEN IF ADVISED OF THE POSSIBILITY OF SUCH DAMAGE.
"""


def download_corpus(into: Path) -> Path:
    """Fetch the corpus wheel with pip (no dependencies) and unzip it; returns english/."""
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet",
                    CORPUS, "-d", str(into)], check=True)
    wheel = next(into.glob("chatterbot_corpus-*.whl"))
    with zipfile.ZipFile(wheel) as zf:
        zf.extractall(into / "unzipped")
    return into / "unzipped" / "chatterbot_corpus" / "data" / "english"


def read_conversations(english: Path) -> list[tuple[str, list[str | None]]]:
    """(category, utterances) per conversation, in file order (files sorted by name).

    YAML may read an utterance such as "yes" as a non-string: those are None, like empty ones.
    """
    conversations = []
    for yml in sorted(english.glob("*.yml")):
        data = yaml.safe_load(yml.read_text(encoding="utf-8")) or {}
        for conversation in data.get("conversations") or []:
            conversations.append((yml.stem, [t.strip() or None if isinstance(t, str) else None for t in conversation]))
    return conversations


def read_rows(english: Path) -> list[dict]:
    """One row per conversation that opens with text, in file order."""
    rows = []
    for category, turns in read_conversations(english):
        if not turns or turns[0] is None:
            continue
        reference = turns[1] if len(turns) > 1 else None
        rows.append({"prompt": turns[0], "reference": reference, "category": category, "language": "en"})
    return rows


def clean(rows: list[dict]) -> list[dict]:
    """Drop empty and over-long prompts, and duplicates (the first one, with its reference, wins)."""
    seen, kept = set(), []
    for row in rows:
        key = row["prompt"].casefold()
        if not row["prompt"] or len(row["prompt"]) > MAX_PROMPT_CHARS or key in seen:
            continue
        seen.add(key)
        kept.append(row)
    return kept


def is_eval(prompt: str) -> bool:
    # A hash of the text, not a position: adding or reordering files moves no prompt across.
    return int(hashlib.sha256(prompt.encode("utf-8")).hexdigest(), 16) % 100 < EVAL_PERCENT


def write_jsonl(path: Path, rows: list[dict]) -> None:
    with path.open("w", encoding="utf-8", newline="\n") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def write_readme(path: Path, n_train: int, n_eval: int, n_conversations: int) -> None:
    path.write_text(f"""\
# Quickstart prompts

Short English chit-chat prompts with reference answers, used by the built-in quickstart recipe.

- `train.jsonl`: {n_train} rows; `eval.jsonl`: {n_eval} rows. Keys: `prompt`, `reference`,
  `category` (the corpus file, e.g. `ai`, `food`), `language` (`en`).
- Source: [chatterbot-corpus](https://github.com/gunthercox/chatterbot-corpus) 1.3.3 by
  Gunther Cox, from PyPI (`pip download --no-deps {CORPUS}`).
- Licence: BSD-3-Clause, see `LICENSE-chatterbot-corpus.txt`.

## How it was built

From each of the {n_conversations} English conversations, the first utterance is the prompt
and the second (if any) the reference. Prompts were deduplicated (strip + casefold, the first
reference kept); empty prompts and prompts over {MAX_PROMPT_CHARS} characters were dropped.
A row goes to eval when `int(sha256(prompt).hexdigest(), 16) % 100 < {EVAL_PERCENT}`; each split
is shuffled with `random.Random(0)`.

Rebuild (from the repository root; needs network access to PyPI):

    {COMMAND}
""", encoding="utf-8")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus-dir", type=Path,
                        help="the corpus's data/english folder (default: download the wheel)")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "data" / "quickstart")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        english = args.corpus_dir or download_corpus(Path(tmp))
        conversations = read_rows(english)
    if not conversations:
        sys.exit(f"no conversations found under {english}")
    rows = clean(conversations)
    train = [r for r in rows if not is_eval(r["prompt"])]
    eval_ = [r for r in rows if is_eval(r["prompt"])]
    random.Random(0).shuffle(train)
    random.Random(0).shuffle(eval_)

    args.out.mkdir(parents=True, exist_ok=True)
    write_jsonl(args.out / "train.jsonl", train)
    write_jsonl(args.out / "eval.jsonl", eval_)
    (args.out / "LICENSE-chatterbot-corpus.txt").write_text(LICENSE, encoding="utf-8")
    write_readme(args.out / "README.md", len(train), len(eval_), len(conversations))
    print(f"conversations: {len(conversations)}  unique prompts: {len(rows)}  "
          f"train: {len(train)}  eval: {len(eval_)}  -> {args.out}")


if __name__ == "__main__":
    main()
