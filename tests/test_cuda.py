"""CUDA paths: run where a GPU is present (skipped elsewhere).

Generation, the training objective and a whole tiny `distil run` on the GPU, each compared
with the CPU result.
"""

from __future__ import annotations

import json

import pytest
import torch

from distil import pipeline
from distil.config.recipe import GenerateConfig
from distil.data.batches import collate
from distil.generation.decoding import generate_batch
from distil.generation.teachers.local import LocalTeacher
from distil.models.sources import load_causal_lm, load_tokenizer
from distil.training.objective import DistillationObjective

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _prompts(n=6):
    g = torch.Generator().manual_seed(0)
    return [torch.randint(5, 200, (3 + i,), generator=g).tolist() for i in range(n)]


def test_generation_on_gpu_matches_cpu(tiny_model_dir):
    cpu = load_causal_lm(tiny_model_dir, device="cpu")
    gpu = load_causal_lm(tiny_model_dir, device="cuda")
    kwargs = dict(pad_id=0, stop_ids={3}, max_new_tokens=8, top_k=4)
    a = generate_batch(cpu, _prompts(), **kwargs)
    b = generate_batch(gpu, _prompts(), **kwargs)
    assert [x.token_ids for x in a] == [y.token_ids for y in b]
    for x, y in zip(a, b):
        assert torch.allclose(torch.tensor(x.topk_logprobs), torch.tensor(y.topk_logprobs), atol=1e-4)


def test_sampled_generation_on_gpu(tiny_model_dir):
    """Sampling draws from a generator on the model's device (a CPU one fails on CUDA), reproducibly."""
    teacher = LocalTeacher(load_causal_lm(tiny_model_dir, device="cuda"), load_tokenizer(tiny_model_dir), "tiny", "tiny")
    settings = GenerateConfig(max_new_tokens=8, do_sample=True, temperature=1.0, top_p=0.9, batch_size=2, seed=3)

    def sampled_ids():
        return [g.token_ids for _, gens in teacher.generate(["hello", "a b c", "x"], settings) for g in gens]

    first = sampled_ids()
    assert first == sampled_ids()
    assert all(len(ids) > 0 for ids in first)


def test_objective_on_gpu_matches_cpu(tiny_model_dir):
    cpu = load_causal_lm(tiny_model_dir, device="cpu")
    rows = []
    for g in generate_batch(cpu, _prompts(), pad_id=0, stop_ids={3}, max_new_tokens=6, top_k=4):
        rows.append(g.__dict__)
    batch = collate(rows, 0)
    values = {}
    for device in ("cpu", "cuda"):
        model = load_causal_lm(tiny_model_dir, device=device).train()
        objective = DistillationObjective(model, alpha=0.3, temperature=2.0, chunk_tokens=7)
        loss, ce, kd, _ = objective(batch.to(device))
        loss.backward()
        values[device] = (loss.item(), ce.item(), kd.item(),
                          model.get_output_embeddings().weight.grad.detach().cpu())
    for x, y in zip(values["cpu"][:3], values["cuda"][:3]):
        assert x == pytest.approx(y, rel=1e-4)
    # Different kernels (cuBLAS, fused attention) sum in a different order than the CPU's.
    diff = (values["cpu"][3] - values["cuda"][3]).abs().max().item()
    print(f"max |grad cpu - grad cuda| = {diff:.3g}")
    torch.testing.assert_close(values["cpu"][3], values["cuda"][3], atol=1e-4, rtol=1e-3)


def test_distil_run_on_gpu(load, tmp_path):
    recipe = load(f"out={tmp_path / 'run'}")
    result = pipeline.run(recipe)
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["student"]["device"] == "cuda:0"
    assert result["train"]["student"]["steps"] == recipe.train.steps
    assert (tmp_path / "run" / "student" / "config.json").exists()
    assert all(torch.isfinite(torch.tensor(m["student"])) for m in report["metrics"].values())


def test_on_policy_and_hidden_matching_on_gpu(load, tmp_path):
    """GKD rollouts (sampled with a generator on the GPU) and hidden-state matching train on CUDA."""
    recipe = load(f"out={tmp_path / 'gkd'}", "train.baseline=false", "train.mode=on_policy", "train.lambda=1",
                  "train.hidden={layers: [[1, 2]], loss: cosine}")
    pipeline.generate(recipe)
    summary = pipeline.train(recipe)["student"]
    assert summary["final"]["on_policy_share"] == 1 and summary["final"]["hidden"] > 0
    assert torch.isfinite(torch.tensor(summary["final"]["loss"]))


def test_speculative_decoding_on_gpu_keeps_the_greedy_output(tiny_model_dir):
    """`distil speculate --device cuda`: target and draft on the GPU, output identical to the target's alone."""
    from distil.deploy.speculate import decode, speculate_paths, stop_ids_of

    result = speculate_paths(str(tiny_model_dir), str(tiny_model_dir), ["hello there", "a b c d"], device="cuda",
                             max_new_tokens=8, draft_tokens=3)
    assert result["device"] == "cuda" and result["prepacked_linears"] is False
    assert result["identical_greedy_output"] == 2 and result["acceptance_rate"] == 1.0
    cpu, gpu = load_causal_lm(tiny_model_dir, device="cpu"), load_causal_lm(tiny_model_dir, device="cuda")
    ids = _prompts(1)[0]
    assert decode(gpu, ids, max_new_tokens=8, stop_ids=stop_ids_of(gpu)) == decode(cpu, ids, max_new_tokens=8,
                                                                                   stop_ids=stop_ids_of(cpu))
