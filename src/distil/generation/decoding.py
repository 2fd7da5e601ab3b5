"""The one decoding primitive teachers, the server and speculate share: batched generation that keeps soft targets.

The loop is ours rather than `model.generate` because it must keep, for every generated
token, the top-k log-probs and the log of the remaining mass, and because on a CPU the
big wins are structural: prompts sorted by length (little padding), large batches kept
full (continuous batching: a finished row leaves the batch and its KV cache, and a waiting
prompt takes its place), and no per-token Python work until a row is done.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator

import torch
from transformers.cache_utils import DynamicCache, DynamicLayer


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


def topk_with_tail(scores: torch.Tensor, k: int):
    """Top-k log-probs, their ids, and the exact log of the mass outside them.

    Args:
        scores: (B, V) logits or log-probs (normalised here).
    Returns:
        (ids (B, k), logprobs (B, k), tail (B,)). One pass over the vocabulary each for the top-k,
        the exponentials and two sums: the tail sums the entries outside the top-k (zeroed in
        place) rather than taking 1 minus their mass, so it stays exact when the top-k hold nearly
        all of it; a row whose rest underflows is summed again in log space.
    """
    top = scores.topk(k, dim=-1)
    peak = top.values[:, :1]
    probs = (scores - peak).exp_()
    log_total = probs.sum(-1).log()
    probs.scatter_(-1, top.indices, 0.0)
    rest = probs.sum(-1)
    tail = rest.log()
    if k < scores.shape[-1] and bool((rest == 0).any()):
        lost = (rest == 0).nonzero().squeeze(-1)
        outside = scores[lost].scatter(-1, top.indices[lost], float("-inf"))
        tail[lost] = torch.logsumexp(outside - peak[lost], dim=-1)
    return top.indices, top.values - peak - log_total[:, None], tail - log_total


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
# Prompts prefilled together are padded to the longest: a run of prompts (in the given order) ends
# where a prompt's own part is longer than this ratio of the run's first, plus this many tokens.
PREFILL_PAD_RATIO = 1.25
PREFILL_PAD_TOKENS = 4


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


class _SlotLayer(DynamicLayer):
    """A KV-cache layer in buffers with room to spare: rows [0, rows) and positions [start, end) are live.

    A decode step writes its position in place (a `DynamicLayer` concatenates: a copy of the whole
    cache every step), a finished row is overwritten by a live row moved into its place, and a
    joining group is written into the free rows after the live ones: only growing past the
    buffer's room copies the whole cache. Positions outside a row's own tokens hold zeros or a
    departed row's values, all finite and masked out.
    """

    def __init__(self, capacity: int, spare: int):
        super().__init__()
        self.capacity, self.spare = capacity, spare  # rows; positions added on the right when growing
        self._k = self._v = None
        self.rows = self.start = self.end = 0
        self.is_initialized = True

    @property
    def keys(self):
        return None if self._k is None else self._k[:self.rows, :, self.start:self.end]

    @keys.setter
    def keys(self, states):  # the base classes' reset to None
        assert states is None
        self._k = None

    @property
    def values(self):
        return None if self._v is None else self._v[:self.rows, :, self.start:self.end]

    @values.setter
    def values(self, states):
        assert states is None
        self._v = None

    def _grow(self, left: int, right: int) -> None:
        """New buffers with `left` more positions before the live ones and `right` after them."""
        width = self.end - self.start
        for name in ("_k", "_v"):
            old = getattr(self, name)
            new = old.new_zeros((self.capacity, old.shape[1], left + width + right, old.shape[3]))
            new[:self.rows, :, left:left + width] = old[:self.rows, :, self.start:self.end]
            setattr(self, name, new)
        self.start, self.end = left, left + width

    def join(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Add a group's rows after the live ones, its positions ending where theirs end."""
        g, heads, width, dim = keys.shape
        if self._k is None:
            self._k = keys.new_zeros((self.capacity, heads, width + self.spare, dim))
            self._v = values.new_zeros((self.capacity, heads, width + self.spare, dim))
            self.start = self.end = width
        if self.end - width < 0:
            self._grow(left=width - (self.end - self.start), right=self.spare)
        self.start = min(self.start, self.end - width)
        self._k[self.rows:self.rows + g, :, self.end - width:self.end] = keys
        self._v[self.rows:self.rows + g, :, self.end - width:self.end] = values
        self.rows += g

    def update(self, key_states, value_states, *args, **kwargs):
        n = key_states.shape[-2]
        if self.end + n > self._k.shape[2]:
            self._grow(left=0, right=n + self.spare)
        self._k[:self.rows, :, self.end:self.end + n] = key_states
        self._v[:self.rows, :, self.end:self.end + n] = value_states
        self.end += n
        return self.keys, self.values

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        """Keep rows `indices` (row i becomes row indices[i]), copying only the rows that move."""
        moved = (indices != torch.arange(len(indices), device=indices.device)).nonzero().squeeze(-1)
        if moved.numel():
            for buffer in (self._k, self._v):
                buffer[moved, :, self.start:self.end] = buffer[indices[moved], :, self.start:self.end]
        self.rows = len(indices)

    def drop_left(self, n: int) -> None:
        """Forget the first `n` live positions (no row attends to them any more), without copying."""
        self.start += n

    def clear(self) -> None:
        """No live rows: the next group starts fresh buffers, so its floats cannot depend on departed rows
        (attention over a wider window of masked positions sums in another order)."""
        self._k = self._v = None
        self.rows = self.start = self.end = 0


class _Batch:
    """The rows being generated together: their KV cache, attention mask, next positions and last tokens.

    Rows may join (a prefilled group, padded on the left to the batch's width) and leave (finished);
    sequence positions no row attends to any more are cut from the left.
    """

    def __init__(self, cache, mask: torch.Tensor, positions: torch.Tensor, last: torch.Tensor, rows: torch.Tensor,
                 slots: torch.Tensor):
        self.cache, self.mask, self.positions, self.last, self.rows, self.slots = cache, mask, positions, last, rows, slots

    def __len__(self) -> int:
        return self.rows.numel()

    @classmethod
    def slotted(cls, group: "_Batch", capacity: int, spare: int) -> "_Batch":
        """An empty batch of `_SlotLayer`s, room for `capacity` rows, shaped for `group` to join."""
        cache = copy.copy(group.cache)
        cache.layers = [_SlotLayer(capacity, spare) for _ in group.cache.layers]
        empty = group.rows[:0]
        return cls(cache, group.mask[:0, :0], empty, empty, empty, empty)

    def keep(self, finished: torch.Tensor) -> None:
        """Drop the finished rows: live rows from the end of the batch move into their places (only they are copied)."""
        alive = ~finished
        n = int(alive.sum())
        order = torch.arange(n, device=finished.device)
        order[finished[:n].nonzero().squeeze(-1)] = alive[n:].nonzero().squeeze(-1) + n
        self.mask, self.positions, self.last = self.mask[order], self.positions[order], self.last[order]
        self.rows, self.slots = self.rows[order], self.slots[order]
        for layer in self.cache.layers:
            layer.batch_select_indices(order)
        slotted = all(isinstance(layer, _SlotLayer) for layer in self.cache.layers)
        if n == 0 and slotted:
            self.mask = self.mask[:, :0]
            for layer in self.cache.layers:
                layer.clear()
            return
        used = self.mask.any(0).nonzero()
        start = int(used[0]) if used.numel() else 0
        if start > 0 and slotted:
            self.mask = self.mask[:, start:]  # the left columns were padding or finished rows' prompts only
            for layer in self.cache.layers:
                layer.drop_left(start)

    def join(self, other: "_Batch") -> None:
        """Add `other`'s rows (this batch's layers are `_SlotLayer`s)."""
        for mine, theirs in zip(self.cache.layers, other.cache.layers):
            mine.join(theirs.keys, theirs.values)
        width = self.cache.layers[0].end - self.cache.layers[0].start
        pad = lambda m: torch.nn.functional.pad(m, (width - m.shape[1], 0))  # noqa: E731
        self.mask = torch.cat([pad(self.mask), pad(other.mask)])
        for name in ("positions", "last", "rows", "slots"):
            setattr(self, name, torch.cat([getattr(self, name), getattr(other, name)]))


def _joinable(model) -> bool:
    """Whether rows can join the model's cache mid-generation (plain per-layer key/value tensors, no sliding window)."""
    try:
        layers = DynamicCache(config=model.config).layers
    except (AttributeError, TypeError, ValueError):  # a config transformers builds no cache from: decode whole batches
        return False
    return all(type(layer) is DynamicLayer for layer in layers)


@torch.inference_mode()
def decode(model, prompt_ids: list[list[int]], *, pad_id: int, stop_ids: set[int], max_new_tokens: int, top_k: int,
           slots: int | None = None, do_sample: bool = False, temperature: float = 1.0, top_p: float = 1.0,
           generator: torch.Generator | None = None,
           on_step: Callable[[list[Generation]], Iterable[int]] | None = None) -> Iterator[tuple[int, Generation]]:
    """Generate for tokenized prompts with a KV cache, keeping soft targets; yields (index, Generation) as rows finish.

    Continuous batching: at most `slots` rows (default: all) generate together, and a finished
    row's slot is refilled from the waiting prompts (taken in the given order; sort them by
    length), prefilled in groups and joined to the running batch. A prefix shared by all prompts
    is computed once and its KV cache copied to every row; the rest is left-padded, and position
    ids follow each row's own tokens, so a row's output does not depend on its neighbours.
    Per-step results stay in tensors until a row finishes. `on_step(results)`, if given, runs
    after every token with every row's Generation so far (filled as it goes) and returns rows
    (indices into the prompts) to finish now, e.g. a server's request that hit its own limit.
    """
    device = next(model.parameters()).device
    n_prompts = len(prompt_ids)
    if n_prompts == 0:
        return
    slots = min(slots or n_prompts, n_prompts)
    results = [Generation(prompt_ids=list(p)) for p in prompt_ids]
    stop = torch.tensor(sorted(stop_ids), dtype=torch.long, device=device)
    joinable = _joinable(model)
    # Chat prompts share a long head (template + system prompt): run it once, not once per row. (Not
    # with a sliding window: the padding between a row's prefix and its own part would use its room.)
    shared = _shared_prefix_len(prompt_ids) if n_prompts > 1 and joinable else 0
    prefix = None
    if shared >= MIN_SHARED_PREFIX:
        prefix = model(input_ids=torch.tensor(prompt_ids[0][:shared], device=device)[None], use_cache=True,
                       logits_to_keep=1).cache
    else:
        shared = 0
    buffers = {"ids": torch.zeros((slots, max_new_tokens, top_k), dtype=torch.int32, device=device),
               "values": torch.zeros((slots, max_new_tokens, top_k), device=device),
               "tail": torch.zeros((slots, max_new_tokens), device=device),
               "chosen": torch.zeros((slots, max_new_tokens), dtype=torch.long, device=device),
               "chosen_lp": torch.zeros((slots, max_new_tokens), device=device)}
    counts = torch.zeros(slots, dtype=torch.long, device=device)  # tokens generated, per slot
    free = list(range(slots))
    waiting = iter(range(n_prompts))
    n_waiting = n_prompts

    batch: _Batch | None = None  # the running rows (in `_SlotLayer`s when rows can join)

    def add(indices: list[int]) -> Iterator[tuple[int, Generation]]:
        """Prefill prompts and add them to the running batch; yields rows that finish at their first token.

        Rows that can join are prefilled in runs of similar length (each padded only to its own longest)."""
        nonlocal batch
        runs = [[indices[0]]]
        for i in indices[1:]:
            shortest = len(prompt_ids[runs[-1][0]]) - shared
            if joinable and len(prompt_ids[i]) - shared > PREFILL_PAD_RATIO * shortest + PREFILL_PAD_TOKENS:
                runs.append([])
            runs[-1].append(i)
        for run in runs:
            group, logits = prefill_run(run)
            yield from step_and_finish(group, logits)
            if not joinable:
                batch = group
            elif len(group):
                if batch is None:
                    batch = _Batch.slotted(group, slots, spare=max_new_tokens)
                batch.join(group)

    def prefill_run(indices: list[int]) -> tuple[_Batch, torch.Tensor]:
        cache, prefix_mask = None, None
        if prefix is not None:
            cache = copy.deepcopy(prefix)
            for layer in cache.layers:
                layer.batch_repeat_interleave(len(indices))
            prefix_mask = torch.ones((len(indices), shared), dtype=torch.long, device=device)
        input_ids, mask = left_pad([prompt_ids[i][shared:] for i in indices], pad_id)
        input_ids, mask = input_ids.to(device), mask.to(device)
        if prefix_mask is not None:
            mask = torch.cat([prefix_mask, mask], dim=-1)  # [shared prefix | left padding | own suffix]
        positions = (mask.cumsum(-1) - 1).clamp(min=0)[:, shared:]
        out = model(input_ids=input_ids, attention_mask=mask, position_ids=positions, cache=cache, use_cache=True,
                    logits_to_keep=1)
        taken = [free.pop() for _ in indices]
        group = _Batch(out.cache, mask, positions[:, -1] + 1, torch.zeros(len(indices), dtype=torch.long, device=device),
                       torch.tensor(indices, device=device), torch.tensor(taken, device=device))
        return group, out.logits[:, -1]

    def record(batch: _Batch, logits: torch.Tensor) -> torch.Tensor:
        """Choose and store each row's next token; returns which rows finished."""
        logits = logits.float()
        ids, values, tail = topk_with_tail(logits, top_k)
        chosen = _choose(logits, do_sample, temperature, top_p, generator) if do_sample else ids[:, 0]
        log_norm = logits.gather(-1, ids[:, :1]).squeeze(-1) - values[:, 0]
        chosen_lp = values[:, 0] if not do_sample else logits.gather(-1, chosen[:, None]).squeeze(-1) - log_norm
        step = counts[batch.slots]
        for name, value in (("ids", ids.int()), ("values", values), ("tail", tail), ("chosen", chosen),
                            ("chosen_lp", chosen_lp)):
            buffers[name][batch.slots, step] = value
        counts[batch.slots] += 1
        batch.last = chosen
        finished = torch.isin(chosen, stop)
        if on_step is not None:
            for r, tok, lp, kid, kval, t in zip(batch.rows.tolist(), chosen.tolist(), chosen_lp.tolist(), ids.tolist(),
                                                values.tolist(), tail.tolist()):
                g = results[r]
                g.token_ids.append(tok)
                g.token_logprobs.append(lp)
                g.topk_ids.append(kid)
                g.topk_logprobs.append(kval)
                g.tail_logprob.append(t)
        return finished

    def finish(batch: _Batch, finished: torch.Tensor, by_stop: torch.Tensor) -> Iterator[tuple[int, Generation]]:
        for r, slot, stopped in zip(batch.rows[finished].tolist(), batch.slots[finished].tolist(),
                                    by_stop[finished].tolist()):
            g = results[r]
            n = int(counts[slot])
            g.token_ids = buffers["chosen"][slot, :n].tolist()
            g.token_logprobs = buffers["chosen_lp"][slot, :n].tolist()
            g.topk_ids = buffers["ids"][slot, :n].tolist()
            g.topk_logprobs = buffers["values"][slot, :n].tolist()
            g.tail_logprob = buffers["tail"][slot, :n].tolist()
            g.finish_reason = "stop" if stopped else "length"
            counts[slot] = 0
            free.append(slot)
            yield r, g

    def step_and_finish(batch: _Batch, logits: torch.Tensor) -> Iterator[tuple[int, Generation]]:
        by_stop = record(batch, logits)
        finished = by_stop | (counts[batch.slots] >= max_new_tokens)
        if on_step is not None:
            extra = set(on_step(results) or ())
            if extra:
                finished = finished | torch.tensor([r in extra for r in batch.rows.tolist()], device=device)
        if finished.any():
            yield from finish(batch, finished, by_stop)
            batch.keep(finished)

    def take(n: int) -> list[int]:
        nonlocal n_waiting
        taken = [next(waiting) for _ in range(min(n, n_waiting))]
        n_waiting -= len(taken)
        return taken

    # Refill when a quarter of the slots are free: prefilling a group costs about as much as one step.
    refill_at = max(1, slots // 4)
    yield from add(take(slots))
    while n_waiting or (batch is not None and len(batch)):
        live = 0 if batch is None else len(batch)
        if n_waiting and (live == 0 or (joinable and len(free) >= refill_at)):
            yield from add(take(len(free)))
            continue
        batch.mask = torch.cat([batch.mask, batch.mask.new_ones((live, 1))], dim=-1)
        out = model(input_ids=batch.last[:, None], attention_mask=batch.mask, position_ids=batch.positions[:, None],
                    cache=batch.cache, use_cache=True)
        batch.positions = batch.positions + 1
        yield from step_and_finish(batch, out.logits[:, -1])


def generate_batch(model, prompt_ids: list[list[int]], **kwargs) -> list[Generation]:
    """`decode` for one batch: every prompt generates together; the Generations in prompt order."""
    results: list[Generation | None] = [None] * len(prompt_ids)
    for i, g in decode(model, prompt_ids, **kwargs):
        results[i] = g
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
