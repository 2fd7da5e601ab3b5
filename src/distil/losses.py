"""Distillation losses: pure functions of tensors.

Sparse losses work on cached teacher targets: per position the teacher's top-k token ids
and log-probs (temperature 1) plus the log of the remaining mass, kept as one extra
"tail" bucket so the divergence stays exact about the tail. The student's distribution is
bucketed the same way: its probabilities at the teacher's top-k ids, plus one minus their sum.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _log1mexp_tail(log_probs: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """log of the probability mass outside `ids`, computed exactly as a logsumexp of the rest."""
    return torch.logsumexp(log_probs.scatter(-1, ids, float("-inf")), dim=-1)


def bucket_teacher(topk_logprobs: torch.Tensor, tail_logprob: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """The teacher's (k+1)-bucket log-probs, tempered.

    Cached targets are stored at temperature 1. At temperature T the k+1 bucket log-probs
    are divided by T and renormalised, treating the tail as one token: exact for the top-k
    ratios, an approximation only for how the tail's mass scales.
    """
    buckets = torch.cat([topk_logprobs, tail_logprob.unsqueeze(-1)], dim=-1)
    if temperature == 1.0:
        return buckets
    return torch.log_softmax(buckets / temperature, dim=-1)


def bucket_student(student_logits: torch.Tensor, topk_ids: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """The student's (k+1)-bucket log-probs at the teacher's top-k ids, from full-vocabulary logits."""
    log_probs = torch.log_softmax(student_logits.float() / temperature, dim=-1)
    picked = log_probs.gather(-1, topk_ids)
    return torch.cat([picked, _log1mexp_tail(log_probs, topk_ids).unsqueeze(-1)], dim=-1)


def _reduce(per_token: torch.Tensor, mask: torch.Tensor | None, reduction: str) -> torch.Tensor:
    if mask is not None:
        per_token = per_token * mask
    if reduction == "none":
        return per_token
    if reduction == "sum":
        return per_token.sum()
    count = mask.sum() if mask is not None else per_token.numel()
    return per_token.sum() / count


def sparse_forward_kl(student_logits: torch.Tensor, topk_ids: torch.Tensor, topk_logprobs: torch.Tensor,
                      tail_logprob: torch.Tensor, *, temperature: float = 1.0, mask: torch.Tensor | None = None,
                      reduction: str = "mean") -> torch.Tensor:
    """KL(p_t || p_s) over k+1 buckets (the teacher's top-k tokens and the tail).

        KL = sum_b p_t[b] * (log p_t[b] - log p_s[b]),  b in top-k ids + {tail}

    Args:
        student_logits: (..., V) student logits.
        topk_ids: (..., k) teacher's top-k token ids.
        topk_logprobs: (..., k) teacher's log-probs for them (temperature 1).
        tail_logprob: (...) log of the teacher's mass outside the top-k.
        temperature: both distributions are softened by it (see `bucket_teacher`); the
            caller multiplies by temperature**2 if it wants the usual gradient scale.
        mask: (...) 1 where a position counts.
        reduction: "mean" over counted positions, "sum", or "none" (per position).
    """
    log_t = bucket_teacher(topk_logprobs.float(), tail_logprob.float(), temperature)
    log_s = bucket_student(student_logits, topk_ids, temperature)
    p_t = log_t.exp()
    # A bucket the teacher gives no mass (e.g. an empty tail when k = V) contributes 0, not 0 * inf.
    per_token = torch.where(p_t > 0, p_t * (log_t - log_s), 0.0).sum(-1)
    return _reduce(per_token, None if mask is None else mask.to(per_token.dtype), reduction)


def cross_entropy(student_logits: torch.Tensor, targets: torch.Tensor, *, mask: torch.Tensor | None = None,
                  reduction: str = "mean") -> torch.Tensor:
    """Token cross-entropy -log p_s(target), reduced like the divergences."""
    per_token = F.cross_entropy(student_logits.float().flatten(0, -2), targets.flatten(), reduction="none")
    per_token = per_token.view(targets.shape)
    return _reduce(per_token, None if mask is None else mask.to(per_token.dtype), reduction)
