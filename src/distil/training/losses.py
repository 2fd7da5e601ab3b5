"""Distillation losses: pure functions of tensors.

Every divergence compares the student's distribution p_s with the teacher's p_t, position by
position, on the last dimension. Each comes in two forms:

- dense, on full-vocabulary logits of both models (an online teacher);
- sparse, on cached teacher targets: per position the teacher's top-k token ids and log-probs
  (temperature 1) plus the log of the remaining mass, kept as one extra "tail" bucket so the
  divergence stays exact about the tail. The student's distribution is bucketed the same way:
  its probabilities at the teacher's top-k ids, plus one minus their sum.

`DIVERGENCES` maps a recipe name to its (dense, sparse) pair; `divergence(name, **params)`
binds the parameters. `chunked_divergence` computes a divergence from the student's hidden
states and LM head chunk by chunk, so the (tokens x vocabulary) logits never exist at once.

No function multiplies by temperature**2: the caller does, if it wants the usual gradient scale.
"""

from __future__ import annotations

import functools
import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

REDUCTIONS = ("mean", "sum", "none")


# --- buckets for cached (sparse) teacher targets --------------------------------------------------


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
    return _bucket_log_probs(_log_softmax(student_logits, temperature), topk_ids)


def _bucket_log_probs(log_probs: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    picked = log_probs.gather(-1, ids)
    return torch.cat([picked, _log1mexp_tail(log_probs, ids).unsqueeze(-1)], dim=-1)


# --- shared pieces ------------------------------------------------------------------------------------


def _log_softmax(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    logits = logits.float()
    # Skip the division at T = 1: on a (tokens x vocabulary) tensor it is a full extra copy.
    return torch.log_softmax(logits if temperature == 1.0 else logits / temperature, dim=-1)


def _reduce(per_token: torch.Tensor, mask: torch.Tensor | None, reduction: str) -> torch.Tensor:
    """Mean over counted positions, sum, or per position ("none").

    A float mask weights positions (the mean divides by the sum of weights). Masked-out
    positions are set to 0 with `where`, not multiplied, so a nan/inf at a padding position
    cannot leak into the result; with nothing counted the mean is 0, not 0/0.
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if mask is not None:
        mask = mask.to(per_token.dtype)
        per_token = torch.where(mask != 0, per_token * mask, 0.0)
    if reduction == "none":
        return per_token
    if reduction == "sum":
        return per_token.sum()
    if mask is None:
        return per_token.sum() / max(per_token.numel(), 1)
    count = mask.sum()
    return per_token.sum() / torch.where(count != 0, count, 1.0)


def _kl(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """sum p * (log p - log q) on the last dimension; a term with p = 0 is 0.

    The difference is zeroed *before* multiplying, so neither the value nor its gradient
    ever sees 0 * inf (an empty bucket has log p = log q = -inf).
    """
    p = log_p.exp()
    return (p * torch.where(p > 0, log_p - log_q, 0.0)).sum(-1)


def _log_mix(log_a: torch.Tensor, log_b: torch.Tensor, w: float) -> torch.Tensor:
    """log(w * a + (1 - w) * b), in log space so tiny probabilities keep their precision."""
    if w == 1.0:
        return log_a
    if w == 0.0:
        return log_b
    a, b = log_a + math.log(w), log_b + math.log1p(-w)
    # logaddexp's gradient is nan where both sides are -inf (an empty bucket, such as the tail
    # when k = V). Route those through finite dummies and put -inf back; _kl ignores them.
    empty = torch.isneginf(a) & torch.isneginf(b)
    mixed = torch.logaddexp(a.masked_fill(empty, 0.0), b.masked_fill(empty, 0.0))
    return mixed.masked_fill(empty, float("-inf"))


def _check_weight(name: str, value: float, *, upper: str = "]") -> None:
    if not (0.0 <= value <= 1.0) or (upper == ")" and value == 1.0):
        raise ValueError(f"{name} must be in [0, 1{upper}, got {value}")


# --- per-token divergences between two log-distributions (last dimension) -----------------------------
# Each takes (log_t, log_s) = the teacher's and the student's log-probs and returns one value per position.


def _forward_kl(log_t, log_s):
    return _kl(log_t, log_s)


def _reverse_kl(log_t, log_s):
    return _kl(log_s, log_t)


def _jsd(log_t, log_s, *, beta: float):
    log_m = _log_mix(log_t, log_s, beta)
    return beta * _kl(log_t, log_m) + (1 - beta) * _kl(log_s, log_m)


def _skew_kl(log_t, log_s, *, skew: float):
    return _kl(log_t, _log_mix(log_t, log_s, skew))


def _skew_reverse_kl(log_t, log_s, *, skew: float):
    return _kl(log_s, _log_mix(log_s, log_t, skew))


def _tvd(log_t, log_s):
    return 0.5 * (log_t.exp() - log_s.exp()).abs().sum(-1)


_PER_TOKEN = {"forward_kl": _forward_kl, "reverse_kl": _reverse_kl, "jsd": _jsd, "skew_kl": _skew_kl,
              "skew_reverse_kl": _skew_reverse_kl, "tvd": _tvd}


def _dense(per_token_fn, student_logits, teacher_logits, temperature, mask, reduction):
    per_token = per_token_fn(_log_softmax(teacher_logits, temperature), _log_softmax(student_logits, temperature))
    return _reduce(per_token, mask, reduction)


def _sparse(per_token_fn, student_logits, topk_ids, topk_logprobs, tail_logprob, temperature, mask, reduction):
    log_t = bucket_teacher(topk_logprobs.float(), tail_logprob.float(), temperature)
    log_s = bucket_student(student_logits, topk_ids, temperature)
    return _reduce(per_token_fn(log_t, log_s), mask, reduction)


# --- dense divergences --------------------------------------------------------------------------------
# Shared Args of the dense functions:
#     student_logits: (..., V) student logits.
#     teacher_logits: (..., V) teacher logits.
#     temperature: T; p_s = softmax(student_logits / T), p_t = softmax(teacher_logits / T).
#     mask: (...) true (or a weight) where a position counts; None counts all.
#     reduction: "mean" over counted positions (0 when none is counted), "sum", or "none".
# Returns: a float32 scalar, or (...) per position for reduction="none".


def forward_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, *, temperature: float = 1.0,
               mask: torch.Tensor | None = None, reduction: str = "mean") -> torch.Tensor:
    """Forward KL, mode-covering: KL(p_t || p_s) = sum_v p_t[v] * (log p_t[v] - log p_s[v]).

    Args:
        student_logits: (..., V) student logits.
        teacher_logits: (..., V) teacher logits.
        temperature: T; p_s = softmax(student_logits / T), p_t = softmax(teacher_logits / T).
        mask: (...) true (or a weight) where a position counts; None counts all.
        reduction: "mean" over counted positions (0 when none is counted), "sum", or "none".

    Returns:
        A float32 scalar, or (...) per position for reduction="none". No T**2 factor.

    Example:
        >>> x = torch.randn(2, 5, 10)
        >>> forward_kl(x, x).abs().item() < 1e-6
        True
    """
    return _dense(_forward_kl, student_logits, teacher_logits, temperature, mask, reduction)


def reverse_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, *, temperature: float = 1.0,
               mask: torch.Tensor | None = None, reduction: str = "mean") -> torch.Tensor:
    """Reverse KL, mode-seeking: KL(p_s || p_t) = sum_v p_s[v] * (log p_s[v] - log p_t[v]).

    Args and Returns: as `forward_kl`.
    """
    return _dense(_reverse_kl, student_logits, teacher_logits, temperature, mask, reduction)


def jsd(student_logits: torch.Tensor, teacher_logits: torch.Tensor, *, beta: float = 0.5, temperature: float = 1.0,
        mask: torch.Tensor | None = None, reduction: str = "mean") -> torch.Tensor:
    """Generalised Jensen-Shannon divergence (as in GKD):

        JSD(beta) = beta * KL(p_t || m) + (1 - beta) * KL(p_s || m),  m = beta * p_t + (1 - beta) * p_s

    Bounded by the entropy of (beta, 1 - beta) (ln 2 at beta = 0.5); 0 at beta = 0 or 1.

    Args:
        beta: the teacher's weight in the mixture m, in [0, 1].
        others: as `forward_kl`.

    Returns: as `forward_kl`.
    """
    _check_weight("beta", beta)
    return _dense(functools.partial(_jsd, beta=beta), student_logits, teacher_logits, temperature, mask, reduction)


def skew_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, *, skew: float = 0.1,
            temperature: float = 1.0, mask: torch.Tensor | None = None, reduction: str = "mean") -> torch.Tensor:
    """Skew forward KL (DistiLLM): KL(p_t || skew * p_t + (1 - skew) * p_s).

    Mixing a little of p_t into the student side keeps the log finite where p_s is tiny,
    so the value is bounded by -log(skew). skew = 0 is forward KL.

    Args:
        skew: the teacher's weight in the mixture, in [0, 1) (at 1 the loss would be a constant 0).
        others: as `forward_kl`.

    Returns: as `forward_kl`.
    """
    _check_weight("skew", skew, upper=")")
    return _dense(functools.partial(_skew_kl, skew=skew), student_logits, teacher_logits, temperature, mask,
                  reduction)


def skew_reverse_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, *, skew: float = 0.1,
                    temperature: float = 1.0, mask: torch.Tensor | None = None,
                    reduction: str = "mean") -> torch.Tensor:
    """Skew reverse KL (DistiLLM): KL(p_s || skew * p_s + (1 - skew) * p_t).

    Bounded by -log(skew). skew = 0 is reverse KL.

    Args:
        skew: the student's weight in the mixture, in [0, 1) (at 1 the loss would be a constant 0).
        others: as `forward_kl`.

    Returns: as `forward_kl`.
    """
    _check_weight("skew", skew, upper=")")
    return _dense(functools.partial(_skew_reverse_kl, skew=skew), student_logits, teacher_logits, temperature,
                  mask, reduction)


def tvd(student_logits: torch.Tensor, teacher_logits: torch.Tensor, *, temperature: float = 1.0,
        mask: torch.Tensor | None = None, reduction: str = "mean") -> torch.Tensor:
    """Total variation distance: 0.5 * sum_v |p_t[v] - p_s[v]|, in [0, 1].

    Args and Returns: as `forward_kl`.
    """
    return _dense(_tvd, student_logits, teacher_logits, temperature, mask, reduction)


# --- sparse divergences (cached teacher targets) -------------------------------------------------------
# Each is its dense twin over k+1 buckets b in (the teacher's top-k ids, tail):
#     p_t[b] = (exp(topk_logprobs), exp(tail_logprob)), tempered as in `bucket_teacher`;
#     p_s[b] = (p_s at topk_ids, 1 - their sum) from softmax(student_logits / T).
# With k = V (tail_logprob = -inf) each equals its dense twin.


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
        reduction: "mean" over counted positions (0 when none is counted), "sum", or "none" (per position).

    Returns:
        A float32 scalar, or (...) per position for reduction="none".
    """
    return _sparse(_forward_kl, student_logits, topk_ids, topk_logprobs, tail_logprob, temperature, mask, reduction)


def sparse_forward_kl_from_log_probs(student_log_probs: torch.Tensor, topk_ids: torch.Tensor,
                                     topk_logprobs: torch.Tensor, tail_logprob: torch.Tensor, *,
                                     temperature: float = 1.0, mask: torch.Tensor | None = None,
                                     reduction: str = "mean") -> torch.Tensor:
    """`sparse_forward_kl` from the student's already-normalised log-probs, the trainer's fast path.

    The trainer computes log_softmax once for cross-entropy and divergence alike. The student's
    tail bucket is log(1 - sum of its top-k probabilities), which needs no (tokens x vocabulary)
    copy; it differs from the exact logsumexp only by float32 cancellation when the student puts
    more than 1 - 1e-6 of its mass on the teacher's top-k (the tail is then clamped to 1e-6).

    Args:
        student_log_probs: (..., V) log_softmax(student_logits / temperature).
        topk_ids, topk_logprobs, tail_logprob, temperature, mask, reduction: as in `sparse_forward_kl`.
    """
    return sparse_divergence_from_log_probs("forward_kl", student_log_probs, topk_ids, topk_logprobs, tail_logprob,
                                            temperature=temperature, mask=mask, reduction=reduction)


def sparse_divergence_from_log_probs(name: str, student_log_probs: torch.Tensor, topk_ids: torch.Tensor,
                                     topk_logprobs: torch.Tensor, tail_logprob: torch.Tensor, *,
                                     temperature: float = 1.0, mask: torch.Tensor | None = None,
                                     reduction: str = "mean", **params: float) -> torch.Tensor:
    """Any sparse divergence of `DIVERGENCES` by name, from the student's already-normalised
    log-probs (the tail as in `sparse_forward_kl_from_log_probs`); `params` as in `divergence`."""
    _check_divergence(name, params)
    picked = student_log_probs.gather(-1, topk_ids)
    tail = torch.log1p(-picked.exp().sum(-1).clamp(max=1 - 1e-6))
    log_s = torch.cat([picked, tail.unsqueeze(-1)], dim=-1)
    log_t = bucket_teacher(topk_logprobs.float(), tail_logprob.float(), temperature)
    return _reduce(functools.partial(_PER_TOKEN[name], **params)(log_t, log_s), mask, reduction)


def sparse_reverse_kl(student_logits: torch.Tensor, topk_ids: torch.Tensor, topk_logprobs: torch.Tensor,
                      tail_logprob: torch.Tensor, *, temperature: float = 1.0, mask: torch.Tensor | None = None,
                      reduction: str = "mean") -> torch.Tensor:
    """KL(p_s || p_t) = sum_b p_s[b] * (log p_s[b] - log p_t[b]) over the k+1 buckets.

    Infinite if the cache says the teacher's tail is empty (tail_logprob = -inf) while the
    student puts mass there: that is what reverse KL means; with k = V both tails are empty.

    Args and Returns: as `sparse_forward_kl`.
    """
    return _sparse(_reverse_kl, student_logits, topk_ids, topk_logprobs, tail_logprob, temperature, mask, reduction)


def sparse_jsd(student_logits: torch.Tensor, topk_ids: torch.Tensor, topk_logprobs: torch.Tensor,
               tail_logprob: torch.Tensor, *, beta: float = 0.5, temperature: float = 1.0,
               mask: torch.Tensor | None = None, reduction: str = "mean") -> torch.Tensor:
    """JSD(beta) = beta * KL(p_t || m) + (1 - beta) * KL(p_s || m), m = beta * p_t + (1 - beta) * p_s,
    over the k+1 buckets.

    Args:
        beta: the teacher's weight in the mixture m, in [0, 1].
        others: as `sparse_forward_kl`.

    Returns: as `sparse_forward_kl`.
    """
    _check_weight("beta", beta)
    return _sparse(functools.partial(_jsd, beta=beta), student_logits, topk_ids, topk_logprobs, tail_logprob,
                   temperature, mask, reduction)


def sparse_skew_kl(student_logits: torch.Tensor, topk_ids: torch.Tensor, topk_logprobs: torch.Tensor,
                   tail_logprob: torch.Tensor, *, skew: float = 0.1, temperature: float = 1.0,
                   mask: torch.Tensor | None = None, reduction: str = "mean") -> torch.Tensor:
    """KL(p_t || skew * p_t + (1 - skew) * p_s) over the k+1 buckets.

    Args:
        skew: the teacher's weight in the mixture, in [0, 1).
        others: as `sparse_forward_kl`.

    Returns: as `sparse_forward_kl`.
    """
    _check_weight("skew", skew, upper=")")
    return _sparse(functools.partial(_skew_kl, skew=skew), student_logits, topk_ids, topk_logprobs, tail_logprob,
                   temperature, mask, reduction)


def sparse_skew_reverse_kl(student_logits: torch.Tensor, topk_ids: torch.Tensor, topk_logprobs: torch.Tensor,
                           tail_logprob: torch.Tensor, *, skew: float = 0.1, temperature: float = 1.0,
                           mask: torch.Tensor | None = None, reduction: str = "mean") -> torch.Tensor:
    """KL(p_s || skew * p_s + (1 - skew) * p_t) over the k+1 buckets.

    Args:
        skew: the student's weight in the mixture, in [0, 1).
        others: as `sparse_forward_kl`.

    Returns: as `sparse_forward_kl`.
    """
    _check_weight("skew", skew, upper=")")
    return _sparse(functools.partial(_skew_reverse_kl, skew=skew), student_logits, topk_ids, topk_logprobs,
                   tail_logprob, temperature, mask, reduction)


def sparse_tvd(student_logits: torch.Tensor, topk_ids: torch.Tensor, topk_logprobs: torch.Tensor,
               tail_logprob: torch.Tensor, *, temperature: float = 1.0, mask: torch.Tensor | None = None,
               reduction: str = "mean") -> torch.Tensor:
    """0.5 * sum_b |p_t[b] - p_s[b]| over the k+1 buckets; a lower bound of the full-vocabulary TVD.

    Args and Returns: as `sparse_forward_kl`.
    """
    return _sparse(_tvd, student_logits, topk_ids, topk_logprobs, tail_logprob, temperature, mask, reduction)


# --- choosing by recipe name ------------------------------------------------------------------------------

DIVERGENCES: dict[str, tuple[Callable[..., torch.Tensor], Callable[..., torch.Tensor]]] = {
    "forward_kl": (forward_kl, sparse_forward_kl),
    "reverse_kl": (reverse_kl, sparse_reverse_kl),
    "jsd": (jsd, sparse_jsd),
    "skew_kl": (skew_kl, sparse_skew_kl),
    "skew_reverse_kl": (skew_reverse_kl, sparse_skew_reverse_kl),
    "tvd": (tvd, sparse_tvd),
}

# The parameters each divergence takes beyond the shared ones, with their defaults.
DIVERGENCE_PARAMS: dict[str, dict[str, float]] = {
    "forward_kl": {}, "reverse_kl": {}, "jsd": {"beta": 0.5},
    "skew_kl": {"skew": 0.1}, "skew_reverse_kl": {"skew": 0.1}, "tvd": {},
}


def divergence(name: str, **params: float) -> tuple[Callable[..., torch.Tensor], Callable[..., torch.Tensor]]:
    """The (dense, sparse) pair of a divergence by recipe name, with its parameters bound.

    Args:
        name: a key of `DIVERGENCES`.
        params: that divergence's own parameters (`beta` for jsd, `skew` for the skew ones);
            missing ones take their defaults, others are an error.

    Returns:
        (dense_fn, sparse_fn), called like `forward_kl` and `sparse_forward_kl`.

    Example:
        >>> dense, sparse = divergence("jsd", beta=0.9)
        >>> x = torch.randn(3, 8)
        >>> dense(x, x).abs().item() < 1e-6
        True
    """
    _check_divergence(name, params)
    dense, sparse = DIVERGENCES[name]
    return functools.partial(dense, **params), functools.partial(sparse, **params)


def _check_divergence(name: str, params: dict) -> None:
    if name not in DIVERGENCES:
        raise ValueError(f"unknown divergence {name!r}; choose one of {sorted(DIVERGENCES)}")
    unknown = set(params) - set(DIVERGENCE_PARAMS[name])
    if unknown:
        allowed = sorted(DIVERGENCE_PARAMS[name]) or "none"
        raise ValueError(f"divergence {name!r} takes no parameter {sorted(unknown)}; its parameters: {allowed}")
    if "beta" in params:
        _check_weight("beta", params["beta"])
    if "skew" in params:
        _check_weight("skew", params["skew"], upper=")")


# --- chunked over tokens -----------------------------------------------------------------------------------


def _lm_head(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """hidden @ weight.T + bias, as (weight @ hidden.T).T.

    Same logits; but written this way autograd returns each chunk's weight gradient in the
    weight's own layout and adds it in place, rather than keeping a third V x H buffer while
    summing the chunks' contributions.
    """
    logits = (weight @ hidden.T).T
    return logits if bias is None else logits + bias


def _chunk_per_token(hidden, weight, bias, teacher, *, per_token_fn, temperature, teacher_weight, teacher_bias):
    """Per-token divergence of one chunk: the student's (and a live teacher's) logits live only here.

    Logits go straight into log_softmax, which keeps only its output for backward, so no
    reference holds them afterwards: the fewer (chunk x V) tensors alive, the lower the peak.
    """
    log_s = _log_softmax(_lm_head(hidden, weight, bias), temperature)
    if len(teacher) == 3:  # sparse cached targets
        ids, top, tail = teacher
        return per_token_fn(bucket_teacher(top.float(), tail.float(), temperature), _bucket_log_probs(log_s, ids))
    (rows,) = teacher
    teacher_logits = rows if teacher_weight is None else F.linear(rows, teacher_weight, teacher_bias)
    return per_token_fn(_log_softmax(teacher_logits, temperature), log_s)


def chunked_divergence(hidden: torch.Tensor, lm_head_weight: torch.Tensor, lm_head_bias: torch.Tensor | None = None,
                       *, name: str = "forward_kl", teacher_logits: torch.Tensor | None = None,
                       teacher_hidden: torch.Tensor | None = None, teacher_lm_head_weight: torch.Tensor | None = None,
                       teacher_lm_head_bias: torch.Tensor | None = None, topk_ids: torch.Tensor | None = None,
                       topk_logprobs: torch.Tensor | None = None, tail_logprob: torch.Tensor | None = None,
                       temperature: float = 1.0, mask: torch.Tensor | None = None, reduction: str = "mean",
                       chunk_tokens: int = 128, **params: float) -> torch.Tensor:
    """A divergence from the student's hidden states, without ever holding all its logits.

    Student logits = hidden @ lm_head_weight.T + bias are computed `chunk_tokens` positions at a
    time; with more than one chunk each is wrapped in activation checkpointing, so its logits
    and softmax intermediates are dropped after forward and recomputed in backward. Peak extra
    memory is a few (chunk_tokens x V) tensors plus two V x H buffers for the LM head's gradient,
    instead of several (N x V); each chunk's forward runs twice (docs/losses.md, Memory). Value
    and gradients (w.r.t. hidden, weight, bias) equal the unchunked computation's.

    The teacher is given in exactly one form:
        teacher_logits (..., V)                                 dense, already computed;
        teacher_hidden (..., H_t) + teacher_lm_head_weight (V, H_t) [+ teacher_lm_head_bias]
                                                                dense, computed per chunk too;
        topk_ids, topk_logprobs (..., k) + tail_logprob (...)   sparse cached targets.

    Args:
        hidden: (..., H) the student's final hidden states at the positions to score.
        lm_head_weight: (V, H) the student's LM head.
        lm_head_bias: (V,) or None.
        name: a key of `DIVERGENCES`; `params` are its parameters (beta, skew).
        temperature, mask, reduction: as in `forward_kl`; mask has the shape of hidden[..., 0].
        chunk_tokens: positions per chunk; smaller saves memory, larger runs fewer matmuls.

    Returns:
        A float32 scalar, or (...) per position for reduction="none".

    Example:
        >>> h, w, t = torch.randn(10, 4), torch.randn(7, 4), torch.randn(10, 7)
        >>> a = chunked_divergence(h, w, teacher_logits=t, chunk_tokens=3)
        >>> torch.allclose(a, forward_kl(h @ w.T, t))
        True
    """
    _check_divergence(name, params)
    per_token_fn = functools.partial(_PER_TOKEN[name], **{**DIVERGENCE_PARAMS[name], **params})
    sparse = topk_ids is not None or topk_logprobs is not None or tail_logprob is not None
    forms = [teacher_logits is not None, teacher_hidden is not None, sparse]
    if sum(forms) != 1:
        raise ValueError("give the teacher as exactly one of: teacher_logits, teacher_hidden (+ its LM head), "
                         "or topk_ids/topk_logprobs/tail_logprob")
    if sparse and (topk_ids is None or topk_logprobs is None or tail_logprob is None):
        raise ValueError("sparse targets need all of topk_ids, topk_logprobs and tail_logprob")
    if (teacher_hidden is None) != (teacher_lm_head_weight is None):
        raise ValueError("teacher_hidden and teacher_lm_head_weight go together")
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be at least 1, got {chunk_tokens}")

    positions = hidden.shape[:-1]
    # Everything per position is flattened to rows, so a chunk is a plain slice.
    if sparse:
        teacher = (topk_ids.reshape(-1, topk_ids.shape[-1]), topk_logprobs.reshape(-1, topk_logprobs.shape[-1]),
                   tail_logprob.reshape(-1))
    else:
        rows = teacher_logits if teacher_logits is not None else teacher_hidden
        teacher = (rows.reshape(-1, rows.shape[-1]),)
    hidden = hidden.reshape(-1, hidden.shape[-1])
    n = hidden.shape[0]
    step = functools.partial(_chunk_per_token, per_token_fn=per_token_fn, temperature=temperature,
                             teacher_weight=teacher_lm_head_weight, teacher_bias=teacher_lm_head_bias)
    # One chunk gains nothing from recomputation: its logits are the whole batch's anyway.
    recompute = n > chunk_tokens and torch.is_grad_enabled()
    per_token = []
    for s in range(0, n, chunk_tokens):
        args = (hidden[s:s + chunk_tokens], lm_head_weight, lm_head_bias,
                tuple(t[s:s + chunk_tokens] for t in teacher))
        per_token.append(checkpoint(step, *args, use_reentrant=False) if recompute else step(*args))
    if not per_token:  # no positions at all
        return _reduce(hidden.new_zeros(positions, dtype=torch.float32), mask, reduction)
    per_token = torch.cat(per_token).reshape(positions)
    return _reduce(per_token, mask, reduction)


def cross_entropy(student_logits: torch.Tensor, targets: torch.Tensor, *, mask: torch.Tensor | None = None,
                  reduction: str = "mean") -> torch.Tensor:
    """Token cross-entropy -log p_s(target), reduced like the divergences."""
    per_token = F.cross_entropy(student_logits.float().flatten(0, -2), targets.flatten(), reduction="none")
    per_token = per_token.view(targets.shape)
    return _reduce(per_token, mask, reduction)


# --- cross-tokenizer -----------------------------------------------------------------------------------


def uld(student_logits: torch.Tensor, teacher_logits: torch.Tensor, *, temperature: float = 1.0,
        mask: torch.Tensor | None = None, reduction: str = "mean") -> torch.Tensor:
    """Universal logit distillation (Boizard et al., 2024): L1 between sorted probabilities.

        ULD = sum_i |sort(p_s)[i] - sort(p_t)[i]|,  both sorted in descending order

    It compares the shapes of the two distributions, rank by rank, so it needs no shared
    vocabulary: the smaller vocabulary is padded with zero probabilities.

    Args:
        student_logits: (..., V_s) student logits.
        teacher_logits: (..., V_t) teacher logits (V_t may differ from V_s).
        temperature, mask, reduction: as in `forward_kl`.
    Returns:
        A float32 scalar, or (...) per position for reduction="none".
    """
    p_s = _log_softmax(student_logits, temperature).exp().sort(dim=-1, descending=True).values
    p_t = _log_softmax(teacher_logits, temperature).exp().sort(dim=-1, descending=True).values
    width = max(p_s.shape[-1], p_t.shape[-1])
    p_s = F.pad(p_s, (0, width - p_s.shape[-1]))
    p_t = F.pad(p_t, (0, width - p_t.shape[-1]))
    return _reduce((p_s - p_t).abs().sum(-1), mask, reduction)


def sparse_uld(student_logits: torch.Tensor, teacher_logprobs: torch.Tensor, teacher_tail: torch.Tensor, *,
               temperature: float = 1.0, mask: torch.Tensor | None = None, reduction: str = "mean") -> torch.Tensor:
    """`uld` against a cached teacher: its k largest probabilities, plus one tail bucket.

        ULD_k = sum_{i<k} |sort(p_s)[i] - p_t[i]| + |(1 - sum_{i<k} sort(p_s)[i]) - tail_t|

    The teacher's log-probs are those of its own top-k (any vocabulary, sorted or not); the
    student's are its own k largest. The tail term is a lower bound of the ranks past k
    (triangle inequality), so with k = V (tail = -inf) this equals `uld` exactly.

    Args:
        student_logits: (..., V_s) student logits.
        teacher_logprobs: (..., k) the teacher's top-k log-probs (temperature 1).
        teacher_tail: (...) log of the teacher's mass outside them.
        temperature: both are softened as in `bucket_teacher`.
        mask, reduction: as in `forward_kl`.
    """
    k = teacher_logprobs.shape[-1]
    log_t = bucket_teacher(teacher_logprobs.float(), teacher_tail.float(), temperature)
    p_t = log_t.exp()
    p_t = torch.cat([p_t[..., :k].sort(dim=-1, descending=True).values, p_t[..., k:]], dim=-1)
    log_s = _log_softmax(student_logits, temperature)
    top = log_s.topk(min(k, log_s.shape[-1]), dim=-1).values.exp()
    top = F.pad(top, (0, k - top.shape[-1]))
    tail = (1 - top.sum(-1)).clamp(min=0)
    p_s = torch.cat([top, tail.unsqueeze(-1)], dim=-1)
    return _reduce((p_s - p_t).abs().sum(-1), mask, reduction)
