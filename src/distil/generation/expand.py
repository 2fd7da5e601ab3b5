"""`data.expand`: the teacher writes more training prompts like the given ones.

Each request shows the teacher a few training prompts of one category and asks for one new
message of the same kind. The requests are ordinary prompts: the teacher answers them like
any other (its recipe settings, local or remote), and its answers are cached rows, so writing
prompts resumes, shards and reuses like the rest of the teacher's work. A written prompt keeps
its request's category; those the teacher did not finish, repeats and copies of training or
held-out prompts are dropped.
"""

from __future__ import annotations

import random
from collections import defaultdict

from distil.config.recipe import Recipe
from distil.data.examples import Example
from distil.data.quality import normalize
from distil.generation.view import TeacherPrompts, cached_rows

INSTRUCTION = ("Here are messages that users sent to an AI assistant:\n\n{examples}\n\n"
               "Write one new message that a user could send, of the same kind and style but about something "
               "else. Reply with the new message only.")
MAX_PROMPT_CHARS = 300


def requests(train: list[Example], n: int, shots: int, seed: int) -> list[Example]:
    """`n` prompt-writing requests; request i shows `shots` prompts of training example i's category
    (cycling through the examples, so each category keeps its share)."""
    rng = random.Random(seed)
    by_category: dict[str | None, list[str]] = defaultdict(list)
    for ex in train:
        by_category[ex.category].append(_text(ex))
    out = []
    for i in range(n):
        category = train[i % len(train)].category
        pool = by_category[category]
        shown = rng.sample(pool, min(shots, len(pool)))
        prompt = INSTRUCTION.format(examples="\n".join(f"- {p}" for p in shown))
        out.append(Example(messages=({"role": "user", "content": prompt},), category=category,
                           source=f"data.expand request {i}"))
    return out


def written_prompts(recipe: Recipe, train: list[Example], held_out: list[Example]) -> list[Example]:
    """The training prompts the teacher wrote for `data.expand` (its answers to `requests`, read from the cache)."""
    d = recipe.data
    asked = requests(train, d.expand, d.expand_shots, recipe.generate.seed)
    rows = cached_rows(recipe, TeacherPrompts(recipe).keys(asked), "data.expand")
    seen = {normalize(_text(ex)) for ex in train + held_out}  # a repeat as data.dedupe: exact counts one
    out = []
    for i, (request, row) in enumerate(zip(asked, rows)):
        text = _clean(row["text"])
        if row.get("finish_reason") != "stop" or not text or len(text) > MAX_PROMPT_CHARS or normalize(text) in seen:
            continue
        seen.add(normalize(text))
        out.append(Example(messages=({"role": "user", "content": text},), category=request.category,
                           source=f"data.expand: row {i}"))
    return out


def _text(ex: Example) -> str:
    return ex.messages[-1]["content"]


def _clean(text: str) -> str:
    """The message alone: without a list marker or quotes the teacher may copy from the request."""
    text = text.strip().removeprefix("- ").strip()
    if len(text) > 1 and text[0] == text[-1] and text[0] in "\"'":
        text = text[1:-1].strip()
    return text
