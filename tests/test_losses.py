"""distil.training.losses against float64 references written independently here (numpy and torch float64)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from references import ref_reduce

from distil.training.losses import bucket_student, bucket_teacher, cross_entropy, sparse_forward_kl

SETTINGS = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# --- independent float64 references --------------------------------------------------------------


def np_log_softmax(x: np.ndarray) -> np.ndarray:
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def np_teacher_targets(teacher_logits: np.ndarray, k: int):
    """Top-k ids and log-probs (temperature 1) and the log of the remaining mass, in float64."""
    logp = np_log_softmax(teacher_logits)
    ids = np.argsort(-logp, axis=-1, kind="stable")[..., :k]
    top = np.take_along_axis(logp, ids, -1)
    rest = logp.copy()
    np.put_along_axis(rest, ids, -np.inf, -1)
    with np.errstate(divide="ignore"):
        tail = np.log(np.exp(rest).sum(-1))  # -inf when k = V
    return ids, top, tail


def np_sparse_forward_kl(student_logits, ids, top, tail, temperature, mask, reduction):
    """Buckets = teacher top-k + one tail bucket, both sides; KL(p_t || p_s) per position.

    Temperature, as documented in losses.bucket_teacher: the teacher's k+1 bucket log-probs are
    divided by T and renormalised; the student's full-vocabulary logits are divided by T first.
    """
    buckets_t = np.concatenate([top, tail[..., None]], -1)
    log_t = buckets_t if temperature == 1 else np_log_softmax(buckets_t / temperature)
    p_s = np.exp(np_log_softmax(student_logits / temperature))
    picked = np.take_along_axis(p_s, ids, -1)
    outside = p_s.copy()
    np.put_along_axis(outside, ids, 0.0, -1)
    with np.errstate(divide="ignore"):
        log_s = np.log(np.concatenate([picked, outside.sum(-1, keepdims=True)], -1))
    p_t = np.exp(log_t)
    with np.errstate(invalid="ignore"):
        terms = np.where(p_t > 0, p_t * (log_t - log_s), 0.0)
    return ref_reduce(terms.sum(-1), mask, reduction)


def torch64_sparse_forward_kl(student_logits, ids, top, tail, temperature, mask, reduction):
    """The same reference in torch float64, for autograd."""
    buckets_t = torch.cat([top, tail[..., None]], -1)
    log_t = buckets_t if temperature == 1 else torch.log_softmax(buckets_t / temperature, -1)
    p_s = torch.softmax(student_logits / temperature, -1)
    picked = p_s.gather(-1, ids)
    outside = (p_s * torch.ones_like(p_s).scatter(-1, ids, 0.0)).sum(-1, keepdim=True)
    log_s = torch.log(torch.cat([picked, outside], -1))
    p_t = log_t.exp()
    return ref_reduce((p_t * (log_t - log_s)).nan_to_num(nan=0.0).sum(-1), mask, reduction)


# --- cases -------------------------------------------------------------------------------------------


@st.composite
def cases(draw, full_vocab: bool = False):
    shape = tuple(draw(st.lists(st.integers(1, 4), min_size=1, max_size=2)))
    vocab = draw(st.integers(2, 40))
    k = vocab if full_vocab else draw(st.integers(1, vocab - 1))
    seed = draw(st.integers(0, 2**31 - 1))
    scale_s = draw(st.sampled_from([0.1, 1.0, 4.0, 12.0]))
    scale_t = draw(st.sampled_from([0.1, 1.0, 4.0, 12.0]))
    temperature = draw(st.sampled_from([1.0, 2.0, 0.5]))
    reduction = draw(st.sampled_from(["mean", "sum", "none"]))
    use_mask = draw(st.booleans())
    rng = np.random.default_rng(seed)
    student = rng.normal(size=shape + (vocab,)) * scale_s
    teacher = rng.normal(size=shape + (vocab,)) * scale_t
    mask = None
    if use_mask:
        mask = (rng.uniform(size=shape) < 0.6).astype(np.float64)
        mask.flat[rng.integers(mask.size)] = 1.0  # at least one counted position
    return dict(student=student, teacher=teacher, k=k, temperature=temperature, reduction=reduction, mask=mask)


def run_distil(case, requires_grad=False):
    ids, top, tail = np_teacher_targets(case["teacher"], case["k"])
    logits = torch.tensor(case["student"], dtype=torch.float32, requires_grad=requires_grad)
    mask = None if case["mask"] is None else torch.tensor(case["mask"], dtype=torch.float32)
    loss = sparse_forward_kl(logits, torch.tensor(ids), torch.tensor(top, dtype=torch.float32),
                             torch.tensor(tail, dtype=torch.float32), temperature=case["temperature"],
                             mask=mask, reduction=case["reduction"])
    return logits, loss, (ids, top, tail)


@SETTINGS
@given(cases())
def test_sparse_forward_kl_matches_float64_reference(case):
    _, loss, (ids, top, tail) = run_distil(case)
    expected = np_sparse_forward_kl(case["student"], ids, top, tail, case["temperature"], case["mask"], case["reduction"])
    assert loss.dtype == torch.float32
    assert tuple(loss.shape) == np.shape(expected)
    np.testing.assert_allclose(loss.detach().numpy(), expected, rtol=1e-4, atol=1e-5)
    assert np.all(np.asarray(expected) >= -1e-12)  # a KL is never negative


@SETTINGS
@given(cases())
def test_sparse_forward_kl_gradient_matches_float64_autograd(case):
    logits, loss, (ids, top, tail) = run_distil(case, requires_grad=True)
    loss.sum().backward()
    ref_logits = torch.tensor(case["student"], dtype=torch.float64, requires_grad=True)
    mask = None if case["mask"] is None else torch.tensor(case["mask"])
    ref = torch64_sparse_forward_kl(ref_logits, torch.tensor(ids), torch.tensor(top), torch.tensor(tail),
                                    case["temperature"], mask, case["reduction"])
    ref.sum().backward()
    np.testing.assert_allclose(logits.grad.numpy(), ref_logits.grad.numpy(), rtol=1e-3, atol=1e-5)


@SETTINGS
@given(cases(full_vocab=True))
def test_full_vocab_equals_dense_kl(case):
    """k = V: the tail is empty (tail_logprob = -inf) and the sparse KL is the dense KL(p_t || p_s)."""
    logits, loss, (_, _, tail) = run_distil(case, requires_grad=True)
    assert np.all(np.isneginf(tail))
    T = case["temperature"]
    ref_logits = torch.tensor(case["student"], requires_grad=True)
    log_t = torch.log_softmax(torch.tensor(case["teacher"]) / T, -1)
    log_s = torch.log_softmax(ref_logits / T, -1)
    per = (log_t.exp() * (log_t - log_s)).sum(-1)
    mask = None if case["mask"] is None else torch.tensor(case["mask"])
    dense = ref_reduce(per, mask, case["reduction"])
    np.testing.assert_allclose(loss.detach().numpy(), dense.detach().numpy(), rtol=1e-4, atol=1e-5)
    loss.sum().backward()
    dense.sum().backward()
    assert torch.isfinite(logits.grad).all()
    np.testing.assert_allclose(logits.grad.numpy(), ref_logits.grad.numpy(), rtol=1e-3, atol=1e-5)


def test_identical_distributions_give_zero():
    torch.manual_seed(0)
    logits = torch.randn(5, 30)
    logp = torch.log_softmax(logits, -1)
    top = logp.topk(6)
    tail = torch.logsumexp(logp.scatter(-1, top.indices, float("-inf")), -1)
    for T in (1.0, 2.0):
        # At T != 1 the teacher's tail is tempered as one token, the student's tail per token,
        # so only T = 1 is exactly zero.
        loss = sparse_forward_kl(logits, top.indices, top.values, tail, temperature=T)
        if T == 1.0:
            assert abs(loss.item()) < 1e-6
        else:
            assert loss.item() >= -1e-6


def test_mask_zero_positions_do_not_count():
    torch.manual_seed(1)
    logits = torch.randn(2, 3, 10)
    logp = torch.log_softmax(torch.randn(2, 3, 10), -1)
    top = logp.topk(4)
    tail = torch.logsumexp(logp.scatter(-1, top.indices, float("-inf")), -1)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    per = sparse_forward_kl(logits, top.indices, top.values, tail, reduction="none")
    masked = sparse_forward_kl(logits, top.indices, top.values, tail, mask=mask, reduction="none")
    assert torch.equal(masked, per * mask)
    mean = sparse_forward_kl(logits, top.indices, top.values, tail, mask=mask)
    torch.testing.assert_close(mean, per[mask.bool()].mean())


def test_bucket_teacher_temperature_is_documented_renormalisation():
    top = torch.log(torch.tensor([[0.5, 0.3]], dtype=torch.float64))
    tail = torch.log(torch.tensor([0.2], dtype=torch.float64))
    assert torch.equal(bucket_teacher(top, tail, 1.0), torch.cat([top, tail[:, None]], -1))
    probs = bucket_teacher(top, tail, 2.0).exp()
    expected = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64) ** 0.5
    torch.testing.assert_close(probs[0], expected / expected.sum())


def test_bucket_student_sums_to_one():
    logits = torch.randn(4, 50)
    ids = torch.randperm(50)[:7].expand(4, 7)
    for T in (1.0, 3.0):
        b = bucket_student(logits, ids, T)
        assert b.shape == (4, 8)
        torch.testing.assert_close(b.exp().sum(-1), torch.ones(4))


# --- cross-entropy ---------------------------------------------------------------------------------


@SETTINGS
@given(shape=st.lists(st.integers(1, 4), min_size=1, max_size=2), vocab=st.integers(2, 40),
       seed=st.integers(0, 2**31 - 1), scale=st.sampled_from([0.1, 1.0, 10.0]),
       reduction=st.sampled_from(["mean", "sum", "none"]), use_mask=st.booleans())
def test_cross_entropy_matches_float64_reference(shape, vocab, seed, scale, reduction, use_mask):
    rng = np.random.default_rng(seed)
    shape = tuple(shape)
    logits64 = torch.tensor(rng.normal(size=shape + (vocab,)) * scale, requires_grad=True)
    targets = torch.tensor(rng.integers(0, vocab, size=shape))
    mask = None
    if use_mask:
        mask = torch.tensor((rng.uniform(size=shape) < 0.6).astype(np.float64))
        mask.view(-1)[int(rng.integers(mask.numel()))] = 1.0
    per = -torch.log_softmax(logits64, -1).gather(-1, targets[..., None]).squeeze(-1)
    ref = ref_reduce(per, mask, reduction)

    logits32 = logits64.detach().float().requires_grad_()
    got = cross_entropy(logits32, targets, mask=None if mask is None else mask.float(), reduction=reduction)
    assert tuple(got.shape) == tuple(ref.shape)
    np.testing.assert_allclose(got.detach().numpy(), ref.detach().numpy(), rtol=1e-5, atol=1e-5)
    got.sum().backward()
    ref.sum().backward()
    np.testing.assert_allclose(logits32.grad.numpy(), logits64.grad.numpy(), rtol=1e-4, atol=1e-6)


def test_cross_entropy_bf16_logits_computed_in_float32():
    logits = torch.randn(3, 7, 20).to(torch.bfloat16)
    targets = torch.randint(0, 20, (3, 7))
    got = cross_entropy(logits, targets)
    assert got.dtype == torch.float32
    ref = torch.nn.functional.cross_entropy(logits.double().flatten(0, 1), targets.flatten())
    assert abs(got.item() - ref.item()) < 1e-5


def test_sparse_kl_sum_is_mean_times_count():
    torch.manual_seed(3)
    logits = torch.randn(6, 12)
    logp = torch.log_softmax(torch.randn(6, 12), -1)
    top = logp.topk(3)
    tail = torch.logsumexp(logp.scatter(-1, top.indices, float("-inf")), -1)
    mean = sparse_forward_kl(logits, top.indices, top.values, tail, reduction="mean")
    total = sparse_forward_kl(logits, top.indices, top.values, tail, reduction="sum")
    torch.testing.assert_close(total, mean * 6)


@pytest.mark.parametrize("name, params", [("forward_kl", {}), ("reverse_kl", {}), ("jsd", {"beta": 0.3}),
                                          ("skew_kl", {"skew": 0.2}), ("skew_reverse_kl", {"skew": 0.2}),
                                          ("tvd", {})])
def test_trainer_fast_path_matches_each_exact_sparse_divergence(name, params):
    """The trainer's one-log-softmax path equals the divergence's exact sparse function in value and gradient."""
    from distil.training.losses import divergence, sparse_divergence_from_log_probs, sparse_forward_kl_from_log_probs

    torch.manual_seed(0)
    n, v, k = 12, 300, 16
    teacher = torch.randn(n, v, dtype=torch.float64) * 3
    lp_t = torch.log_softmax(teacher, -1)
    top = lp_t.topk(k, dim=-1)
    tail = torch.logsumexp(lp_t.scatter(-1, top.indices, float("-inf")), -1)
    for temperature in (1.0, 2.0):
        a = (torch.randn(n, v) * 2).requires_grad_()
        b = a.detach().clone().requires_grad_()
        targets = (top.indices, top.values.float(), tail.float())
        exact = divergence(name, **params)[1](a, *targets, temperature=temperature, reduction="sum")
        fast = sparse_divergence_from_log_probs(name, torch.log_softmax(b / temperature, -1), *targets,
                                                temperature=temperature, reduction="sum", **params)
        assert fast.item() == pytest.approx(exact.item(), rel=1e-5, abs=1e-6)
        exact.backward()
        fast.backward()
        torch.testing.assert_close(b.grad, a.grad, atol=1e-6, rtol=1e-4)
        if name == "forward_kl":
            kl = sparse_forward_kl_from_log_probs(torch.log_softmax(a.detach() / temperature, -1), *targets,
                                                  temperature=temperature, reduction="sum")
            assert kl.item() == fast.item()
