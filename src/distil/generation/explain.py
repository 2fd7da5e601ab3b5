"""Explanation tuning (`generate.explain`): the teacher is asked for step-by-step reasoning, the
student learns that reasoning and the answer from the plain prompt.

The teacher's system prompt gets `generate.explain_prompt` added, so it writes a rationale
and a final "Answer: ..." line; that changed prompt is what the cache key hashes. The student
trains (and is evaluated) on the teacher's whole text after the prompt *without* the
instruction: it learns to reason unprompted, and at deployment it is asked plainly.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from distil.generation.decoding import encode_prompt

ANSWER_LINE = re.compile(r"^\s*(?:final answer|answer)\s*[:\-]\s*(.+?)\s*$", re.IGNORECASE | re.MULTILINE)


def teacher_chat(messages: Sequence[dict], recipe) -> tuple[list[dict], str | None]:
    """(messages, system prompt) to render for the teacher: the example's chat and data.system_prompt,
    with generate.explain's instruction appended to the system message (the chat's own, or the recipe's)."""
    system = recipe.data.system_prompt
    if not recipe.generate.explain:
        return list(messages), system
    instruction = recipe.generate.explain_prompt
    chat = [{"role": m["role"], "content": m["content"]} for m in messages]
    own = next((m for m in chat if m["role"] == "system"), None)
    if own is not None:
        own["content"] = f"{own['content']}\n\n{instruction}"
        return chat, None
    return chat, f"{system}\n\n{instruction}" if system else instruction


def with_prompts(rows: list[dict], prompts: list[str], tokenizer, max_prompt_tokens: int) -> list[dict]:
    """Copies of `rows` whose prompt (text and ids) is `prompts`, tokenized as the teacher tokenized its own
    (chat-templated prompts carry their special tokens; the last `max_prompt_tokens` kept)."""
    return [{**row, "prompt": prompt, "prompt_ids": encode_prompt(tokenizer, prompt, max_prompt_tokens)}
            for row, prompt in zip(rows, prompts)]


def final_answer(text: str) -> str | None:
    """The text after the last "Answer:" (or "Final answer:") line, or None if there is none."""
    found = ANSWER_LINE.findall(text or "")
    return found[-1] if found else None
