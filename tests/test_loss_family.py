"""The divergence family in distil.training.losses against float64 references written independently here.

The references work in plain probability space (softmax, mixtures as weighted sums, log of
ratios) in torch.float64; the implementation works in float32 log space. Gradients are
compared with float64 autograd of the references.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from references import ref_reduce

from distil.training import losses
from distil.training.losses import DIVERGENCES, chunked_divergence, divergence

NAMES = ["forward_kl", "reverse_kl", "jsd", "skew_kl", "skew_reverse_kl", "tvd"]
SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# --- independent float64 references ---------------------------------------------------------------------


def ref_kl(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    return torch.where(p > 0, p * torch.log(p / q), 0.0).sum(-1)


def ref_divergence(name: str, p_t: torch.Tensor, p_s: torch.Tensor, params: dict) -> torch.Tensor:
    """Per-position divergence from probabilities (float64), straight from the definitions."""
    if name == "forward_kl":
        return ref_kl(p_t, p_s)
    if name == "reverse_kl":
        return ref_kl(p_s, p_t)
    if name == "jsd":
        b = params["beta"]
        m = b * p_t + (1 - b) * p_s
        return b * ref_kl(p_t, m) + (1 - b) * ref_kl(p_s, m)
    if name == "skew_kl":
        a = params["skew"]
        return ref_kl(p_t, a * p_t + (1 - a) * p_s)
    if name == "skew_reverse_kl":
        a = params["skew"]
        return ref_kl(p_s, a * p_s + (1 - a) * p_t)
    if name == "tvd":
        return 0.5 * (p_t - p_s).abs().sum(-1)
    raise AssertionError(name)


def ref_teacher_targets(teacher_logits: torch.Tensor, k: int):
    """Top-k ids and log-probs (temperature 1) and the log of the remaining mass, in float64."""
    logp = torch.log_softmax(teacher_logits, -1)
    top = logp.topk(k, dim=-1)
    rest = logp.exp().scatter(-1, top.indices, 0.0).sum(-1)
    return top.indices, top.values, torch.log(rest)  # log(0) = -inf when k = V


def ref_buckets(student_logits, ids, top, tail, temperature):
    """(p_t, p_s) over the k+1 buckets, as documented in losses.bucket_teacher: the teacher's
    bucket probabilities are raised to 1/T and renormalised; the student is tempered first."""
    p_t = torch.cat([top, tail[..., None]], -1).exp() ** (1 / temperature)
    p_t = p_t / p_t.sum(-1, keepdim=True)
    p_s = torch.softmax(student_logits / temperature, -1)
    picked = p_s.gather(-1, ids)
    outside = p_s.scatter(-1, ids, 0.0).sum(-1, keepdim=True)
    return p_t, torch.cat([picked, outside], -1)


# --- cases -----------------------------------------------------------------------------------------------


def draw_params(draw, name: str) -> dict:
    if name == "jsd":
        return {"beta": draw(st.sampled_from([0.0, 0.1, 0.5, 0.9, 1.0]))}
    if name in ("skew_kl", "skew_reverse_kl"):
        return {"skew": draw(st.sampled_from([0.0, 0.1, 0.5, 0.9]))}
    return {}


@st.composite
def cases(draw, name: str, full_vocab: bool = False):
    shape = tuple(draw(st.lists(st.integers(1, 4), min_size=1, max_size=2)))
    vocab = draw(st.sampled_from([2, 3, 7, 16, 40]))
    k = vocab if full_vocab else draw(st.integers(1, vocab - 1))
    rng = np.random.default_rng(draw(st.integers(0, 2**31 - 1)))
    scale_s = draw(st.sampled_from([0.1, 1.0, 4.0, 12.0]))
    scale_t = draw(st.sampled_from([0.1, 1.0, 4.0, 12.0]))
    mask = None
    if draw(st.booleans()):
        mask = torch.tensor(rng.uniform(size=shape) < 0.6, dtype=torch.float64)
        mask.view(-1)[int(rng.integers(mask.numel()))] = 1.0  # at least one counted position
    return dict(
        student=torch.tensor(rng.normal(size=shape + (vocab,)) * scale_s),
        teacher=torch.tensor(rng.normal(size=shape + (vocab,)) * scale_t),
        k=k, mask=mask, params=draw_params(draw, name),
        temperature=draw(st.sampled_from([1.0, 2.0, 0.5])),
        reduction=draw(st.sampled_from(["mean", "sum", "none"])),
    )


def run(fn, case, *teacher_args):
    """Call a distil loss in float32 on the case; returns (float32 student logits leaf, loss)."""
    logits = case["student"].float().requires_grad_()
    mask = None if case["mask"] is None else case["mask"].bool()  # bool masks, to exercise the conversion
    loss = fn(logits, *(t.float() if t.is_floating_point() else t for t in teacher_args),
              temperature=case["temperature"], mask=mask, reduction=case["reduction"], **case["params"])
    return logits, loss


def grad_atol(case) -> float:
    """Absolute gradient tolerance for float32.

    The gradients of reverse-type divergences are p_s * (f - E_ps[f]) with f = log p_s - log p_t,
    which cancels at a dominant token; f's float32 rounding (about eps32 * |log p|, and |log p|
    reaches ~200 for the sharpest cases here) bounds the absolute error, not the float64 answer.
    """
    T = case["temperature"]
    spread = sum(torch.log_softmax(case[x] / T, -1).abs().max().item() for x in ("student", "teacher"))
    return max(1e-5, 5e-7 * spread)


def assert_matches(logits, loss, ref_logits, ref, case):
    assert loss.dtype == torch.float32
    assert loss.shape == ref.shape
    np.testing.assert_allclose(loss.detach().numpy(), ref.detach().numpy(), rtol=1e-4, atol=1e-5)
    loss.sum().backward()
    ref.sum().backward()
    assert torch.isfinite(logits.grad).all()
    np.testing.assert_allclose(logits.grad.numpy(), ref_logits.grad.numpy(), rtol=1e-3, atol=grad_atol(case))


@pytest.mark.parametrize("name", NAMES)
@SETTINGS
@given(data=st.data())
def test_dense_matches_float64_reference(name, data):
    case = data.draw(cases(name))
    logits, loss = run(DIVERGENCES[name][0], case, case["teacher"])
    T = case["temperature"]
    ref_logits = case["student"].clone().requires_grad_()
    per = ref_divergence(name, torch.softmax(case["teacher"] / T, -1), torch.softmax(ref_logits / T, -1),
                         case["params"])
    assert_matches(logits, loss, ref_logits, ref_reduce(per, case["mask"], case["reduction"]), case)


@pytest.mark.parametrize("name", NAMES)
@SETTINGS
@given(data=st.data())
def test_sparse_matches_float64_reference(name, data):
    case = data.draw(cases(name))
    ids, top, tail = ref_teacher_targets(case["teacher"], case["k"])
    logits, loss = run(DIVERGENCES[name][1], case, ids, top, tail)
    ref_logits = case["student"].clone().requires_grad_()
    p_t, p_s = ref_buckets(ref_logits, ids, top, tail, case["temperature"])
    ref = ref_reduce(ref_divergence(name, p_t, p_s, case["params"]), case["mask"], case["reduction"])
    assert_matches(logits, loss, ref_logits, ref, case)


@pytest.mark.parametrize("name", NAMES)
@SETTINGS
@given(data=st.data())
def test_sparse_with_full_vocab_equals_dense(name, data):
    """k = V: the tail bucket is empty on both sides (tail_logprob = -inf) and sparse == dense."""
    case = data.draw(cases(name, full_vocab=True))
    ids, top, tail = ref_teacher_targets(case["teacher"], case["k"])
    assert torch.isneginf(tail).all()
    sparse_logits, sparse = run(DIVERGENCES[name][1], case, ids, top, tail)
    dense_logits, dense = run(DIVERGENCES[name][0], case, case["teacher"])
    np.testing.assert_allclose(sparse.detach().numpy(), dense.detach().numpy(), rtol=1e-4, atol=1e-5)
    sparse.sum().backward()
    dense.sum().backward()
    assert torch.isfinite(sparse_logits.grad).all()
    np.testing.assert_allclose(sparse_logits.grad.numpy(), dense_logits.grad.numpy(), rtol=1e-3, atol=grad_atol(case))


# --- chunked ---------------------------------------------------------------------------------------------


@SETTINGS
@given(name=st.sampled_from(NAMES), data=st.data())
def test_chunked_equals_unchunked(name, data):
    positions = tuple(data.draw(st.lists(st.integers(1, 6), min_size=1, max_size=2)))
    vocab, width = data.draw(st.integers(2, 24)), data.draw(st.integers(1, 6))
    chunk = data.draw(st.integers(1, 12))
    form = data.draw(st.sampled_from(["teacher_logits", "teacher_hidden", "sparse"]))
    use_bias = data.draw(st.booleans())
    T = data.draw(st.sampled_from([1.0, 2.0]))
    reduction = data.draw(st.sampled_from(["mean", "sum", "none"]))
    params = draw_params(data.draw, name)
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1)))
    hidden = torch.randn(positions + (width,), generator=g)
    weight = torch.randn(vocab, width, generator=g)
    bias = torch.randn(vocab, generator=g) if use_bias else None
    t_hidden, t_weight = torch.randn(positions + (5,), generator=g), torch.randn(vocab, 5, generator=g) * 2
    t_bias = torch.randn(vocab, generator=g)
    teacher_logits = F.linear(t_hidden, t_weight, t_bias)
    mask = torch.rand(positions, generator=g) < 0.7 if data.draw(st.booleans()) else None
    k = data.draw(st.integers(1, vocab))
    ids, top, tail = ref_teacher_targets(teacher_logits.double(), k)
    top, tail = top.float(), tail.float()
    teacher = {"teacher_logits": dict(teacher_logits=teacher_logits),
               "teacher_hidden": dict(teacher_hidden=t_hidden, teacher_lm_head_weight=t_weight,
                                      teacher_lm_head_bias=t_bias),
               "sparse": dict(topk_ids=ids, topk_logprobs=top, tail_logprob=tail)}[form]
    common = dict(temperature=T, mask=mask, reduction=reduction)

    leaves = [hidden.requires_grad_(), weight.requires_grad_()] + ([bias.requires_grad_()] if use_bias else [])
    got = chunked_divergence(hidden, weight, bias, name=name, chunk_tokens=chunk, **teacher, **common, **params)
    got_grads = torch.autograd.grad(got.sum(), leaves)

    dense_fn, sparse_fn = divergence(name, **params)
    logits = F.linear(hidden, weight, bias)
    if form == "sparse":
        ref = sparse_fn(logits, ids, top, tail, **common)
    else:
        ref = dense_fn(logits, teacher_logits, **common)
    ref_grads = torch.autograd.grad(ref.sum(), leaves)

    assert got.shape == ref.shape
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
    for a, b in zip(got_grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_chunked_keeps_no_full_logits_for_backward():
    """What autograd keeps between forward and backward is per-chunk inputs, never (N x V)."""
    n, vocab, width, chunk = 64, 300, 8, 16
    hidden = torch.randn(n, width, requires_grad=True)
    weight = torch.randn(vocab, width, requires_grad=True)
    teacher = torch.randn(n, vocab)
    saved = []

    def pack(t):
        saved.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        chunked_divergence(hidden, weight, teacher_hidden=hidden.detach(), teacher_lm_head_weight=weight.detach(),
                           chunk_tokens=chunk).backward()
    assert max(saved) < n * vocab
    saved.clear()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        losses.forward_kl(hidden @ weight.T, teacher)  # the unchunked way does keep them
    assert max(saved) >= n * vocab


def test_chunked_checks_its_teacher_arguments():
    h, w = torch.randn(4, 3), torch.randn(5, 3)
    with pytest.raises(ValueError, match="exactly one"):
        chunked_divergence(h, w)
    with pytest.raises(ValueError, match="exactly one"):
        chunked_divergence(h, w, teacher_logits=torch.randn(4, 5), topk_ids=torch.zeros(4, 1, dtype=torch.long))
    with pytest.raises(ValueError, match="all of"):
        chunked_divergence(h, w, topk_ids=torch.zeros(4, 1, dtype=torch.long))
    with pytest.raises(ValueError, match="go together"):
        chunked_divergence(h, w, teacher_hidden=torch.randn(4, 3))
    with pytest.raises(ValueError, match="unknown divergence"):
        chunked_divergence(h, w, teacher_logits=torch.randn(4, 5), name="kl")


# --- edge cases ------------------------------------------------------------------------------------------


def sparse_targets_of(logits: torch.Tensor, k: int):
    logp = torch.log_softmax(logits.double(), -1)
    top = logp.topk(k)
    tail = torch.logsumexp(logp.scatter(-1, top.indices, float("-inf")), -1)
    return top.indices, top.values.float(), tail.float()


@pytest.mark.parametrize("name", NAMES)
def test_identical_distributions_give_zero(name):
    torch.manual_seed(0)
    logits = torch.randn(3, 5, 30) * 3
    dense, sparse = divergence(name)
    for T in (0.5, 1.0, 4.0):
        assert abs(dense(logits, logits.clone(), temperature=T).item()) < 1e-6
    # Sparse: exactly zero at T = 1. At T != 1 the teacher's tail is tempered as one token and the
    # student's token by token (see bucket_teacher), so the buckets differ slightly.
    for k in (1, 6, 30):
        assert abs(sparse(logits, *sparse_targets_of(logits, k)).item()) < 1e-6


def entropy(b: float) -> float:
    return -sum(x * math.log(x) for x in (b, 1 - b) if x > 0)


# Disjoint one-hot p_t and p_s: what each divergence must give (KLs grow with the logit gap / T).
DISJOINT = {
    "forward_kl": lambda T: 2e4 / T, "reverse_kl": lambda T: 2e4 / T,
    "jsd": lambda T: entropy(0.5), "skew_kl": lambda T: -math.log(0.1), "skew_reverse_kl": lambda T: -math.log(0.1),
    "tvd": lambda T: 1.0,
}


@pytest.mark.parametrize("name", NAMES)
def test_very_peaked_logits_stay_finite_and_exact(name):
    vocab = 50
    teacher = torch.full((4, vocab), -1e4)
    teacher[:, 3] = 1e4
    student = torch.full((4, vocab), -1e4)
    # Rows 0, 1, 3: disjoint from the teacher; row 2: identical.
    student[torch.arange(4), torch.tensor([7, 7, 3, 45])] = 1e4
    student.requires_grad_()
    dense, sparse = divergence(name)
    for T in (1.0, 2.0):
        per = dense(student, teacher, temperature=T, reduction="none")
        expected = torch.tensor([DISJOINT[name](T)] * 4)
        expected[2] = 0.0
        torch.testing.assert_close(per, expected, rtol=1e-5, atol=1e-6)
        (grad,) = torch.autograd.grad(per.sum(), student)
        assert torch.isfinite(grad).all()
    for k in (1, 8):  # student token 7 in the top-k or in the tail: a different bucket either way
        ids, top, tail = sparse_targets_of(teacher, k)
        per = sparse(student, ids, top, tail, reduction="none")
        assert torch.isfinite(per).all()
        # rtol: a student token in the tail bucket shares it with the teacher's V - k tail tokens,
        # which shifts the reverse KLs by log(V - k) out of 2e4.
        torch.testing.assert_close(per[[0, 1, 3]], torch.tensor([DISJOINT[name](1.0)] * 3), rtol=1e-3, atol=1e-6)
        (grad,) = torch.autograd.grad(per.sum(), student)
        assert torch.isfinite(grad).all()


@pytest.mark.parametrize("name", NAMES)
def test_mask_all_false_mean_is_zero_not_nan(name):
    student = torch.randn(2, 3, 11, requires_grad=True)
    teacher = torch.randn(2, 3, 11)
    mask = torch.zeros(2, 3, dtype=torch.bool)
    dense, sparse = divergence(name)
    for loss in (dense(student, teacher, mask=mask),
                 sparse(student, *sparse_targets_of(teacher, 4), mask=mask),
                 chunked_divergence(student, torch.eye(11), name=name, teacher_logits=teacher,
                                    mask=mask, chunk_tokens=2)):
        assert loss.item() == 0.0
        (grad,) = torch.autograd.grad(loss, student)
        assert torch.equal(grad, torch.zeros_like(grad))


def test_float_mask_weights_positions_and_padding_cannot_poison_the_value():
    student = torch.randn(4, 9)
    teacher = torch.randn(4, 9)
    per = losses.forward_kl(student, teacher, reduction="none")
    weights = torch.tensor([1.0, 0.5, 0.0, 2.0])
    torch.testing.assert_close(losses.forward_kl(student, teacher, mask=weights), (per * weights).sum() / 3.5)
    student[2] = float("nan")  # a padded position with garbage logits
    assert torch.isfinite(losses.forward_kl(student, teacher, mask=weights))


# --- registry and argument checks ------------------------------------------------------------------------


def test_registry_names_and_pairs():
    assert sorted(DIVERGENCES) == sorted(NAMES)
    assert DIVERGENCES["forward_kl"] == (losses.forward_kl, losses.sparse_forward_kl)
    for name, (dense, sparse) in DIVERGENCES.items():
        assert dense.__name__ == name and sparse.__name__ == "sparse_" + name
        assert dense.__doc__ and sparse.__doc__


def test_divergence_binds_parameters_and_defaults():
    torch.manual_seed(2)
    s, t = torch.randn(5, 12), torch.randn(5, 12)
    dense, _ = divergence("jsd", beta=0.2)
    torch.testing.assert_close(dense(s, t), losses.jsd(s, t, beta=0.2))
    dense, _ = divergence("jsd")
    torch.testing.assert_close(dense(s, t), losses.jsd(s, t, beta=0.5))
    dense, sparse = divergence("skew_kl")
    torch.testing.assert_close(dense(s, t), losses.skew_kl(s, t, skew=0.1))
    ids, top, tail = sparse_targets_of(t, 3)
    torch.testing.assert_close(sparse(s, ids, top, tail), losses.sparse_skew_kl(s, ids, top, tail, skew=0.1))


def test_divergence_rejects_bad_names_and_parameters():
    with pytest.raises(ValueError, match="unknown divergence"):
        divergence("kld")
    with pytest.raises(ValueError, match="takes no parameter"):
        divergence("forward_kl", beta=0.5)
    with pytest.raises(ValueError, match="takes no parameter"):
        divergence("jsd", alpha=0.5)
    with pytest.raises(ValueError, match=r"in \[0, 1\)"):
        divergence("skew_kl", skew=1.5)
    with pytest.raises(ValueError, match=r"in \[0, 1\)"):
        losses.skew_reverse_kl(torch.zeros(2, 3), torch.zeros(2, 3), skew=1.0)
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        losses.jsd(torch.zeros(2, 3), torch.zeros(2, 3), beta=-0.1)
    with pytest.raises(ValueError, match="reduction"):
        losses.tvd(torch.zeros(2, 3), torch.zeros(2, 3), reduction="avg")
