"""Speculative decoding with a student draft: greedy output identical to the target alone."""

from __future__ import annotations

import json
import time

import pytest
import torch
from conftest import run_cli

from distil.deploy.speculate import TorchDraft, can_prepack, decode, new_counts, prepack_linears, speculate, stop_ids_of
from distil.errors import DistilError
from distil.models.students import student_from_teacher


@pytest.fixture(scope="module")
def target_and_prompts(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    target = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    prompts = [tokenizer(p)["input_ids"] for p in ("how do you cook rice ?", "tell me about stars and moons",
                                                   "why is the sky blue ?")]
    return target, prompts, tokenizer.pad_token_id


def _generate(target, ids, max_new_tokens, pad):
    return target.generate(torch.tensor([ids]), max_new_tokens=max_new_tokens, do_sample=False,
                           pad_token_id=pad)[0, len(ids):].tolist()


@pytest.mark.parametrize("draft_tokens", [1, 3, 5])
def test_decode_with_a_student_draft_is_the_targets_greedy_output(target_and_prompts, draft_tokens):
    target, prompts, pad = target_and_prompts
    draft = TorchDraft(student_from_teacher(target, [0, 3]).eval())
    counts = new_counts()
    for ids in prompts:
        expected = _generate(target, ids, 14, pad)
        assert decode(target, ids, max_new_tokens=14, stop_ids=stop_ids_of(target)) == expected
        assert decode(target, ids, max_new_tokens=14, stop_ids=stop_ids_of(target), draft=draft, draft_tokens=draft_tokens,
                      counts=counts) == expected
    assert counts["rounds"] > 0 and counts["proposed"] <= draft_tokens * counts["rounds"]
    assert 0 <= counts["accepted"] <= counts["proposed"]


def test_decode_stops_at_a_stop_token_inside_an_accepted_proposal(target_and_prompts, monkeypatch):
    target, prompts, pad = target_and_prompts
    monkeypatch.setattr(target.generation_config, "eos_token_id", None)
    full = _generate(target, prompts[0], 12, pad)
    stop = full[4]
    monkeypatch.setattr(target.generation_config, "eos_token_id", stop)
    counts = new_counts()  # with itself as the draft, the stop arrives in a proposal
    out = decode(target, prompts[0], max_new_tokens=12, stop_ids={stop}, draft=TorchDraft(target), draft_tokens=4, counts=counts)
    assert out == full[:full.index(stop) + 1]
    assert counts["accepted"] == counts["proposed"] > 0
    assert _generate(target, prompts[0], 12, pad) == out


def test_decode_times_the_drafts_proposals_and_the_targets_verification(target_and_prompts):
    target, prompts, _ = target_and_prompts
    pause = 0.01

    class SlowDraft(TorchDraft):
        def propose(self, *args, **kwargs):
            time.sleep(pause)
            return super().propose(*args, **kwargs)

    counts = new_counts()
    started = time.perf_counter()
    decode(target, prompts[0], max_new_tokens=10, stop_ids=set(), draft=SlowDraft(student_from_teacher(target, [0]).eval()),
           draft_tokens=2, counts=counts)
    wall = time.perf_counter() - started
    assert counts["rounds"] > 0 and counts["verify_s"] > 0
    assert counts["draft_s"] >= pause * counts["rounds"]
    assert counts["draft_s"] + counts["verify_s"] <= wall


def test_student_draft_keeps_the_targets_greedy_output(target_and_prompts):
    target, prompts, pad = target_and_prompts
    draft = student_from_teacher(target, [0, 3]).eval()
    for engine in ("distil", "transformers"):
        result = speculate(target, draft, prompts, max_new_tokens=12, pad_id=pad, engine=engine)
        assert result["identical_greedy_output"] == len(prompts) == result["prompts"]
        assert result["draft_tokens_proposed"] > 0 and 0.0 <= result["acceptance_rate"] <= 1.0
        assert result["target_tokens_per_s"] > 0 and result["speculative_tokens_per_s"] > 0
        timed = result["draft_ms_per_round"], result["verify_ms_per_round"]
        assert all(ms > 0 for ms in timed) if engine == "distil" else timed == (None, None)


def test_prepacked_linears_give_the_same_logits_and_greedy_output(target_and_prompts):
    import copy

    target, prompts, pad = target_and_prompts
    assert can_prepack(target)
    packed = prepack_linears(copy.deepcopy(target))
    assert not any(isinstance(m, torch.nn.Linear) for m in packed.modules())
    for ids in prompts:
        x = torch.tensor([ids])
        with torch.inference_mode():
            torch.testing.assert_close(packed(x).logits, target(x).logits, rtol=0, atol=1e-4)
        assert decode(packed, ids, max_new_tokens=10, stop_ids=stop_ids_of(target)) == _generate(target, ids, 10, pad)


def test_a_draft_identical_to_the_target_is_always_accepted(target_and_prompts):
    target, prompts, pad = target_and_prompts
    for engine in ("distil", "transformers"):
        result = speculate(target, target, prompts, max_new_tokens=12, draft_tokens=4, pad_id=pad, engine=engine)
        assert result["acceptance_rate"] == 1.0 and result["identical_greedy_output"] == len(prompts)


def test_an_unknown_or_missing_device_is_refused(tiny_model_dir):
    from distil.deploy.speculate import speculate_paths

    with pytest.raises(DistilError, match='field "device".*unknown device'):
        speculate_paths(str(tiny_model_dir), str(tiny_model_dir), ["hi"], device="tpu")
    if not torch.cuda.is_available():
        with pytest.raises(DistilError, match='field "device".*no CUDA GPU'):
            speculate_paths(str(tiny_model_dir), str(tiny_model_dir), ["hi"], device="cuda")


def test_a_draft_with_another_vocabulary_is_refused(target_and_prompts):
    from transformers import LlamaConfig, LlamaForCausalLM

    target, prompts, pad = target_and_prompts
    other = LlamaForCausalLM(LlamaConfig(vocab_size=target.config.vocab_size + 7, hidden_size=16, intermediate_size=32,
                                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1))
    with pytest.raises(DistilError, match='field "draft".*vocabulary'):
        speculate(target, other, prompts, max_new_tokens=4, pad_id=pad)


def test_cli_speculate(tiny_model_dir, prompts_files, distil_home):
    _, eval_file = prompts_files
    proc = run_cli("speculate", "--target", str(tiny_model_dir), "--draft", str(tiny_model_dir), "--prompts", str(eval_file),
                   "--n", "2", "--max-new-tokens", "6", env_extra={"DISTIL_HOME": str(distil_home)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout[proc.stdout.index("{"):])
    assert result["prompts"] == 2 and result["identical_greedy_output"] == 2 and result["acceptance_rate"] == 1.0
    assert result["device"] == ("cuda" if torch.cuda.is_available() else "cpu")


def test_a_gguf_draft_in_llama_cpp_keeps_the_targets_greedy_output(bpe_model_dir, tmp_path):
    """The student as it ships (GGUF, run by llama.cpp: the `llama` extra) drafts for a torch target."""
    pytest.importorskip("llama_cpp")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from distil.deploy.export import export_model
    from distil.deploy.speculate import LlamaCppDraft

    target = AutoModelForCausalLM.from_pretrained(bpe_model_dir, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(bpe_model_dir)
    draft = LlamaCppDraft(export_model(bpe_model_dir, "gguf", tmp_path / "draft.gguf", "f16").path, threads=1)
    prompts = [tokenizer(p)["input_ids"] for p in ("how do you cook rice ?", "tell me about stars and planets and moons")]
    counts = new_counts()
    for ids in prompts:
        want = _generate(target, ids, 16, tokenizer.pad_token_id)
        assert decode(target, ids, max_new_tokens=16, stop_ids=stop_ids_of(target), draft=draft, draft_tokens=3,
                      counts=counts) == want
    # the draft is the target itself, stored in f16: llama.cpp's greedy choices are nearly all the target's
    assert counts["accepted"] >= 0.9 * counts["proposed"] > 0
    result = speculate(target, draft, prompts, max_new_tokens=8, draft_tokens=2, pad_id=tokenizer.pad_token_id)
    assert result["identical_greedy_output"] == 2


def test_cli_speculate_runs_a_gguf_draft_in_llama_cpp(bpe_model_dir, prompts_files, distil_home, tmp_path):
    pytest.importorskip("llama_cpp")
    from distil.deploy.export import export_model

    gguf = export_model(bpe_model_dir, "gguf", tmp_path / "draft.gguf", "q8_0").path
    _, eval_file = prompts_files
    proc = run_cli("speculate", "--target", str(bpe_model_dir), "--draft", str(gguf), "--prompts", str(eval_file),
                   "--n", "2", "--max-new-tokens", "6", env_extra={"DISTIL_HOME": str(distil_home)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout[proc.stdout.index("{"):])
    assert result["draft_runtime"] == "llama.cpp" and result["prepacked_linears"] is True
    assert result["identical_greedy_output"] == 2 and result["draft_tokens_proposed"] > 0


def test_a_confidence_floor_shortens_proposals_and_keeps_the_output(target_and_prompts):
    target, prompts, pad = target_and_prompts
    draft = TorchDraft(student_from_teacher(target, [0, 3]).eval())
    seen = {}
    for floor in (0.0, 0.5, 1.0):
        counts = new_counts()
        for ids in prompts:
            assert decode(target, ids, max_new_tokens=14, stop_ids=stop_ids_of(target), draft=draft, draft_tokens=4,
                          min_confidence=floor, counts=counts) == _generate(target, ids, 14, pad)
        seen[floor] = counts["proposed"] / counts["rounds"]
    # a floor of 1 stops after every first token; no floor proposes the full 4 whenever there is room
    assert seen[1.0] == 1.0 < seen[0.0] and seen[0.0] >= seen[0.5] >= 1.0
