"""Speculative decoding with a student draft: greedy output identical to the target alone."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import run_cli
from distil.errors import DistilError
from distil.models import student_from_teacher
from distil.speculate import speculate


@pytest.fixture(scope="module")
def target_and_prompts(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    target = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    prompts = [tokenizer(p)["input_ids"] for p in ("how do you cook rice ?", "tell me about stars and moons",
                                                   "why is the sky blue ?")]
    return target, prompts, tokenizer.pad_token_id


def test_student_draft_keeps_the_targets_greedy_output(target_and_prompts):
    target, prompts, pad = target_and_prompts
    draft = student_from_teacher(target, [0, 3]).eval()
    result = speculate(target, draft, prompts, max_new_tokens=12, pad_id=pad)
    assert result["identical_greedy_output"] == len(prompts) == result["prompts"]
    assert result["draft_tokens_proposed"] > 0 and 0.0 <= result["acceptance_rate"] <= 1.0
    assert result["target_tokens_per_s"] > 0 and result["speculative_tokens_per_s"] > 0


def test_a_draft_identical_to_the_target_is_always_accepted(target_and_prompts):
    target, prompts, pad = target_and_prompts
    result = speculate(target, target, prompts, max_new_tokens=12, draft_tokens=4, pad_id=pad)
    assert result["acceptance_rate"] == 1.0 and result["identical_greedy_output"] == len(prompts)


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
