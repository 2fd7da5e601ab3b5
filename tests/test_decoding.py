"""The decoding loop (distil.generation.decoding): continuous batching and the top-k/tail targets."""

from __future__ import annotations

import pytest
import torch

from distil.generation.decoding import decode, generate_batch, topk_with_tail


def test_topk_with_tail_matches_float64_log_softmax():
    torch.manual_seed(0)
    logits = torch.randn(16, 3000) * 4
    logits[0, 7] = 250.0  # nearly all the mass on one id: 1 - top-k mass would round to 0
    want = torch.log_softmax(logits.double(), -1)
    top = want.topk(8)
    tail_want = want.scatter(-1, top.indices, float("-inf")).logsumexp(-1)
    for scores in (logits, torch.log_softmax(logits, -1)):  # from logits or from log-probs
        ids, values, tail = topk_with_tail(scores, 8)
        assert torch.equal(ids, top.indices)
        torch.testing.assert_close(values.double(), top.values, atol=1e-5, rtol=0)
        torch.testing.assert_close(tail.double(), tail_want, atol=1e-4, rtol=1e-6)
    assert tail[0] < -200  # summed in log space where the rest underflows, not -inf


@pytest.fixture
def tiny(tiny_model_dir):
    from distil.models.sources import load_causal_lm

    return load_causal_lm(tiny_model_dir, device="cpu").eval()


def prompts(n: int, shared: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    head = torch.randint(5, 200, (shared,), generator=g).tolist()
    return [head + torch.randint(5, 200, (int(torch.randint(1, 9, (1,), generator=g)),), generator=g).tolist()
            for _ in range(n)]


@pytest.fixture
def sliding(tiny_model_dir):
    """A tiny Mistral with a 6-token sliding window: its cache layers cannot take joining rows."""
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(0)
    config = MistralConfig(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, sliding_window=6, max_position_embeddings=64)
    return MistralForCausalLM(config).eval()


@pytest.mark.parametrize("shared", [0, 6], ids=["no-shared-prefix", "shared-prefix"])
@pytest.mark.parametrize("slots", [1, 3, 5])
@pytest.mark.parametrize("order", ["shortest-first", "shuffled"])
def test_continuous_batching_equals_one_prompt_at_a_time(tiny, shared, slots, order):
    """Rows joining a running batch (left-padded caches, wider or narrower than it, rows moved
    into finished rows' places, cut columns) get what they get alone."""
    check_against_one_at_a_time(tiny, shared, slots, order)


@pytest.mark.parametrize("slots", [1, 4])
def test_a_sliding_window_model_generates_in_whole_batches(sliding, slots):
    check_against_one_at_a_time(sliding, 6, slots, "shuffled")


def check_against_one_at_a_time(model, shared: int, slots: int, order: str):
    ps = sorted(prompts(13, shared), key=len)
    if order == "shuffled":
        ps = [ps[i] for i in torch.randperm(len(ps), generator=torch.Generator().manual_seed(3)).tolist()]
    kwargs = dict(pad_id=0, max_new_tokens=9, top_k=4)
    tiny = model
    free = [generate_batch(tiny, [p], stop_ids=set(), **kwargs)[0] for p in ps]
    # Stop on tokens some rows write early, so slots free up at different steps.
    kwargs["stop_ids"] = {free[0].token_ids[2], free[6].token_ids[5]}
    alone = [generate_batch(tiny, [p], **kwargs)[0] for p in ps]
    assert {g.finish_reason for g in alone} == {"stop", "length"}, "the prompts exercise both endings"
    finished = list(decode(tiny, ps, slots=slots, **kwargs))
    got = dict(finished)
    assert sorted(got) == list(range(len(ps))) and len(finished) == len(ps)
    for i, want in enumerate(alone):
        g = got[i]
        assert g.token_ids == want.token_ids, i
        assert g.topk_ids == want.topk_ids and g.finish_reason == want.finish_reason
        torch.testing.assert_close(torch.tensor(g.token_logprobs), torch.tensor(want.token_logprobs), atol=1e-4, rtol=0)
        torch.testing.assert_close(torch.tensor(g.topk_logprobs), torch.tensor(want.topk_logprobs), atol=1e-4, rtol=0)
        torch.testing.assert_close(torch.tensor(g.tail_logprob), torch.tensor(want.tail_logprob), atol=1e-4, rtol=0)


def test_one_slot_gives_each_row_exactly_what_it_gets_alone(tiny):
    """With one slot nothing is batched, so a row's floats must not depend on the rows before it
    (a resumed or sharded generation then writes the very rows of an uninterrupted one)."""
    ps = [p for p in prompts(8, 0, seed=5)]
    ps = sorted(ps, key=len, reverse=True)  # a narrower row after a wider one: the departed row's window is wider
    kwargs = dict(pad_id=0, stop_ids=set(), max_new_tokens=6, top_k=4)
    got = dict(decode(tiny, ps, slots=1, **kwargs))
    for i, p in enumerate(ps):
        want = generate_batch(tiny, [p], **kwargs)[0]
        assert got[i].topk_logprobs == want.topk_logprobs and got[i].tail_logprob == want.tail_logprob, i


def test_on_step_sees_tokens_as_they_come_and_can_finish_a_row(tiny):
    ps = prompts(3, 6, seed=2)
    seen = []

    def on_step(results):
        seen.append([len(g.token_ids) for g in results])
        return [0] if len(results[0].token_ids) == 2 else []

    gens = generate_batch(tiny, ps, pad_id=0, stop_ids=set(), max_new_tokens=5, top_k=2, on_step=on_step)
    assert [len(g.token_ids) for g in gens] == [2, 5, 5]
    assert seen[0] == [1, 1, 1] and seen[1] == [2, 2, 2] and seen[2] == [2, 3, 3]


@pytest.mark.parametrize("dtype", ["bfloat16", "int8"])
def test_lower_precision_teachers_load_and_key_their_own_rows(tiny_model_dir, load, dtype):
    from distil.generation.view import generation_settings
    from distil.models.sources import load_causal_lm

    full = load_causal_lm(tiny_model_dir, device="cpu")
    low = load_causal_lm(tiny_model_dir, dtype, device="cpu")
    linear = low.get_decoder().layers[0].mlp.down_proj
    if dtype == "int8":
        assert "quantized" in type(linear).__module__ and low.get_output_embeddings().weight.dtype == torch.float32
    else:
        assert linear.weight.dtype == torch.bfloat16
    ids = torch.tensor([prompts(1, 0)[0] * 4])
    with torch.no_grad():
        want = torch.log_softmax(full(input_ids=ids).logits.double(), -1)
        got = torch.log_softmax(low(input_ids=ids).logits.double(), -1)
    kl = (want.exp() * (want - got)).sum(-1)
    assert 0 < kl.max() < 0.05  # close to the float32 teacher, not equal to it
    assert generation_settings(load(f"teacher.dtype={dtype}")) != generation_settings(load())
