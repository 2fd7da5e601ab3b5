"""The one decoding primitive teachers, the server and speculate share: batched generation that keeps soft targets.

The loop is ours rather than `model.generate` because it must keep, for every generated
token, the top-k log-probs and the log of the remaining mass, and because on a CPU the
big wins are structural: prompts sorted by length (little padding), large batches, and
rows that finished dropped from the batch (and its KV cache) instead of padded along.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch


@dataclass
class Generation:
    """What the teacher wrote for one prompt, with its per-token distributions (temperature 1)."""
    prompt_ids: list[int]
    token_ids: list[int] = field(default_factory=list)
    token_logprobs: list[float] = field(default_factory=list)  # log p(chosen token)
    topk_ids: list[list[int]] = field(default_factory=list)
    topk_logprobs: list[list[float]] = field(default_factory=list)
    tail_logprob: list[float] = field(default_factory=list)  # log(1 - sum of top-k probs)
    finish_reason: str = "length"
    text: str = ""


def stop_token_ids(tokenizer, model) -> set[int]:
    ids = set()
    for source in (tokenizer.eos_token_id, getattr(model.generation_config, "eos_token_id", None),
                   model.config.eos_token_id):
        if source is None:
            continue
        ids.update(source if isinstance(source, (list, tuple)) else [source])
    return ids


def topk_with_tail(logprobs: torch.Tensor, k: int):
    """Top-k log-probs, their ids, and the exact log of the mass outside them.

    Args:
        logprobs: (B, V) normalised log-probs.
    Returns:
        (ids (B, k), logprobs (B, k), tail (B,)); tail is computed as a logsumexp over the
        remaining entries, so it stays exact when the top-k hold nearly all the mass.
    """
    top = logprobs.topk(k, dim=-1)
    rest = logprobs.scatter(-1, top.indices, float("-inf"))
    return top.indices, top.values, torch.logsumexp(rest, dim=-1)


def seeded_generator(model, seed: int) -> torch.Generator:
    """A random generator for sampling from `model`: on its device, where torch.multinomial needs it."""
    return torch.Generator(device=next(model.parameters()).device).manual_seed(seed)


def _choose(logits: torch.Tensor, do_sample: bool, temperature: float, top_p: float,
            generator: torch.Generator | None) -> torch.Tensor:
    if not do_sample:
        return logits.argmax(-1)
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        drop = sorted_p.cumsum(-1) - sorted_p > top_p  # keep the smallest prefix reaching top_p
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


MIN_SHARED_PREFIX = 4


def _shared_prefix_len(prompt_ids: list[list[int]]) -> int:
    """Length of the token prefix all prompts share, leaving every prompt at least one own token."""
    first = prompt_ids[0]
    n = min(len(p) for p in prompt_ids) - 1
    for ids in prompt_ids[1:]:
        n = min(n, next((i for i, (a, b) in enumerate(zip(first, ids)) if a != b), n))
    return max(n, 0)


def left_pad(prompts: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids padded on the left to one width, and their attention mask (1 on real tokens)."""
    width = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, ids in enumerate(prompts):
        input_ids[i, width - len(ids):] = torch.tensor(ids)
        mask[i, width - len(ids):] = 1
    return input_ids, mask


@torch.inference_mode()
def generate_batch(model, prompt_ids: list[list[int]], *, pad_id: int, stop_ids: set[int],
                   max_new_tokens: int, top_k: int, do_sample: bool = False, temperature: float = 1.0,
                   top_p: float = 1.0, generator: torch.Generator | None = None,
                   on_step: Callable[[list[Generation]], Iterable[int]] | None = None) -> list[Generation]:
    """Generate for one batch of tokenized prompts with a KV cache, keeping soft targets.

    A prefix shared by all prompts is computed once and its KV cache copied to every row;
    the rest is left-padded, and position ids follow the attention mask so a row's output
    does not depend on its neighbours. A row that emits a stop token leaves the batch.
    `on_step(results)`, if given, runs after every token and returns rows (indices into
    the prompts) to finish now, e.g. a server's request that hit its own limit or stop string.
    """
    device = next(model.parameters()).device
    results = [Generation(prompt_ids=list(p)) for p in prompt_ids]
    # Chat prompts share a long head (template + system prompt): run it once, not once per row.
    shared = _shared_prefix_len(prompt_ids) if len(prompt_ids) > 1 else 0
    cache, prefix_mask = None, None
    if shared >= MIN_SHARED_PREFIX:
        prefix = torch.tensor(prompt_ids[0][:shared], device=device)[None]
        cache = model(input_ids=prefix, use_cache=True, logits_to_keep=1).cache
        for layer in cache.layers:
            layer.batch_repeat_interleave(len(prompt_ids))
        prefix_mask = torch.ones((len(prompt_ids), shared), dtype=torch.long, device=device)
    else:
        shared = 0
    suffixes = [p[shared:] for p in prompt_ids]
    input_ids, mask = left_pad(suffixes, pad_id)
    input_ids, mask = input_ids.to(device), mask.to(device)
    if prefix_mask is not None:
        mask = torch.cat([prefix_mask, mask], dim=-1)  # [shared prefix | left padding | own suffix]
    positions = (mask.cumsum(-1) - 1).clamp(min=0)[:, shared:]
    active = torch.arange(len(prompt_ids), device=device)  # rows of `results` still generating
    stop = torch.tensor(sorted(stop_ids), dtype=torch.long, device=device)
    out = model(input_ids=input_ids, attention_mask=mask, position_ids=positions, cache=cache, use_cache=True,
                logits_to_keep=1)
    cache = out.cache
    for step in range(max_new_tokens):
        logits = out.logits[:, -1].float()
        logprobs = torch.log_softmax(logits, dim=-1)
        chosen = _choose(logits, do_sample, temperature, top_p, generator)
        ids, values, tail = topk_with_tail(logprobs, top_k)
        chosen_lp = logprobs.gather(-1, chosen[:, None]).squeeze(-1)
        rows = (active.tolist(), chosen.tolist(), chosen_lp.tolist(), ids.tolist(), values.tolist(), tail.tolist())
        for r, tok, lp, kid, kval, t in zip(*rows):
            g = results[r]
            g.token_ids.append(tok)
            g.token_logprobs.append(lp)
            g.topk_ids.append(kid)
            g.topk_logprobs.append(kval)
            g.tail_logprob.append(t)
        finished = torch.isin(chosen, stop)
        for r in active[finished].tolist():
            results[r].finish_reason = "stop"
        if on_step is not None:
            extra = set(on_step(results) or ())
            if extra:
                finished = finished | torch.tensor([r in extra for r in active.tolist()], device=device)
        if step == max_new_tokens - 1:
            break
        keep = (~finished).nonzero().squeeze(-1)
        if keep.numel() == 0:
            break
        if keep.numel() < active.numel():
            active, chosen, mask, positions = active[keep], chosen[keep], mask[keep], positions[keep]
            for layer in cache.layers:
                layer.batch_select_indices(keep)
        mask = torch.cat([mask, mask.new_ones((mask.shape[0], 1))], dim=-1)
        positions = positions[:, -1:] + 1
        out = model(input_ids=chosen[:, None], attention_mask=mask, position_ids=positions,
                    cache=cache, use_cache=True)
    return results


def encode_prompt(tokenizer, prompt_text: str, max_tokens: int | None = None) -> list[int]:
    """Token ids of a formatted prompt as every teacher reads it, keeping its last `max_tokens` tokens."""
    # Chat-templated prompts already carry their special tokens.
    ids = tokenizer(prompt_text, add_special_tokens=not tokenizer.chat_template)["input_ids"]
    return ids[-max_tokens:] if max_tokens else ids


@torch.no_grad()
def target_log_probs(model, batch, last_hidden: torch.Tensor | None = None) -> torch.Tensor:
    """The model's full next-token log-probs (float32) at the batch's target positions: (targets, vocab).

    How a teacher scores text it did not write (an ensemble member scoring the first teacher's answer,
    an on-policy rollout). `last_hidden`: the model's last hidden state for the batch, when a forward
    pass already computed it.
    """
    if last_hidden is None:
        last_hidden = model.base_model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).last_hidden_state
    hidden = last_hidden.flatten(0, 1)[batch.target_pos]
    return torch.log_softmax(model.get_output_embeddings()(hidden).float(), dim=-1)
