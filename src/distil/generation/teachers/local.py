"""A local Hugging Face causal LM as a teacher: prompts answered shortest first, with continuous batching."""

from __future__ import annotations

import time
from typing import Iterator

from distil.generation.cache import SHARD_SECONDS
from distil.generation.decoding import Generation, decode, encode_prompt, seeded_generator, stop_token_ids


class LocalTeacher:
    """A local causal LM plus its tokenizer, answering prompt texts in batches.

    Args:
        model: a causal LM in eval mode.
        tokenizer: its tokenizer (a pad token set).
        identity: a content fingerprint of the model (see `distil.models.sources.resolve`).
        name: a short name for reports.
    """

    def __init__(self, model, tokenizer, identity: str, name: str):
        self.model, self.tokenizer, self.identity, self.name = model, tokenizer, identity, name
        self.stop_ids = stop_token_ids(tokenizer, model)

    def encode(self, prompt_text: str, max_tokens: int | None = None) -> list[int]:
        return encode_prompt(self.tokenizer, prompt_text, max_tokens)

    def generate(self, prompt_texts: list[str], settings, *, max_prompt_tokens: int | None = None
                 ) -> Iterator[tuple[list[int], list[Generation]]]:
        """Generate for all prompts, `settings.batch_size` at a time with continuous batching, shortest first.

        Args:
            prompt_texts: formatted prompts (chat template applied).
            settings: a `GenerateConfig` (max_new_tokens, do_sample, temperature, top_p, top_k, batch_size, seed).
            max_prompt_tokens: longer prompts keep their last this-many tokens.
        Yields:
            (indices into prompt_texts, their Generations) in groups of finished rows: settings.shard_rows,
            or fewer at the end or after `SHARD_SECONDS` (each group becomes one cache shard).
        """
        encoded = [self.encode(t, max_prompt_tokens) for t in prompt_texts]
        order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))  # similar lengths: little padding
        generator = seeded_generator(self.model, settings.seed) if settings.do_sample else None
        done, since = [], time.monotonic()
        for j, g in decode(self.model, [encoded[i] for i in order], pad_id=self.tokenizer.pad_token_id,
                           stop_ids=self.stop_ids, max_new_tokens=settings.max_new_tokens, top_k=settings.top_k,
                           slots=settings.batch_size, do_sample=settings.do_sample, temperature=settings.temperature,
                           top_p=settings.top_p, generator=generator):
            g.text = self.tokenizer.decode(g.token_ids, skip_special_tokens=True).strip()
            done.append((order[j], g))
            if len(done) >= settings.shard_rows or time.monotonic() - since > SHARD_SECONDS:
                yield [i for i, _ in done], [g for _, g in done]
                done, since = [], time.monotonic()
        if done:
            yield [i for i, _ in done], [g for _, g in done]
