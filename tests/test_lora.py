"""LoRA: distilling into adapters, `distil adapt` on labelled data, and merged models."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import run_cli, write_jsonl

from distil.errors import DistilError


def _logits(model, ids):
    with torch.inference_mode():
        return model(torch.tensor([ids])).logits[0]


def test_recipe_student_lora_trains_only_adapters_and_saves_them(load, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from distil import pipeline

    recipe = load("student.lora={r: 4, lora_alpha: 8, target_modules: [q_proj, v_proj, down_proj]}", "train.baseline=false",
                  "train.lr=0.01")
    pipeline.generate(recipe)
    pipeline.train(recipe)
    out = tmp_path / "out"
    adapter = out / "student-lora"
    assert (adapter / "adapter_config.json").exists() and (adapter / "adapter_model.safetensors").exists()
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["r"] == 4 and set(config["target_modules"]) == {"q_proj", "v_proj", "down_proj"}

    base = AutoModelForCausalLM.from_pretrained(adapter / "base", dtype=torch.float32).eval()
    merged = AutoModelForCausalLM.from_pretrained(out / "student", dtype=torch.float32).eval()
    # Only adapted layers moved: k_proj and the embeddings are the untrained student's.
    base_sd, merged_sd = base.state_dict(), merged.state_dict()
    assert torch.equal(base_sd["model.layers.0.self_attn.k_proj.weight"], merged_sd["model.layers.0.self_attn.k_proj.weight"])
    assert torch.equal(base_sd["model.embed_tokens.weight"], merged_sd["model.embed_tokens.weight"])
    assert not torch.equal(base_sd["model.layers.0.self_attn.q_proj.weight"], merged_sd["model.layers.0.self_attn.q_proj.weight"])
    # peft loads base + adapters to the same function as the merged plain model.
    ids = AutoTokenizer.from_pretrained(out / "student")("how do you cook rice ?")["input_ids"]
    with_adapters = PeftModel.from_pretrained(base, adapter).eval()
    assert torch.allclose(_logits(with_adapters, ids), _logits(merged, ids), atol=1e-4)


def test_bad_target_module_names_the_field(load, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    from distil.models.lora import wrap

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with pytest.raises(DistilError, match='field "lora.target_modules".*qkv'):
        wrap(model, 4, 8, ["qkv"])


@pytest.fixture
def labelled(tmp_path):
    rows = [{"prompt": f"name {c} color ?", "reference": f"the {c} is blue"} for c in ("cat", "dog", "bird", "fish")]
    return write_jsonl(tmp_path / "domain.jsonl", rows * 2)


def test_adapt_learns_the_domain_and_merge_matches_the_adapters(tiny_model_dir, labelled, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from distil.data.examples import load_examples
    from distil.deploy.adapt import adapt, labelled_rows
    from distil.models.sources import load_tokenizer

    summary = adapt(tiny_model_dir, labelled, tmp_path / "adapter", r=8, alpha=16, steps=30, lr=0.02, batch_size=4)
    merged_summary = adapt(tiny_model_dir, labelled, tmp_path / "merged", r=8, alpha=16, steps=30, lr=0.02,
                           batch_size=4, merge_into_model=True)
    assert summary["final"]["loss"] == pytest.approx(merged_summary["final"]["loss"], rel=1e-5)  # same seed, same run

    tokenizer = load_tokenizer(tiny_model_dir)
    rows = labelled_rows(load_examples(labelled), tokenizer)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()

    def nll(model):
        total = 0.0
        for r in rows:
            logits = _logits(model, r["prompt_ids"] + r["token_ids"])[len(r["prompt_ids"]) - 1:-1]
            total += torch.nn.functional.cross_entropy(logits, torch.tensor(r["token_ids"]), reduction="sum").item()
        return total

    before = nll(base)
    adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32),
                                        tmp_path / "adapter").eval()
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    assert nll(adapted) < 0.5 * before  # it learned the labelled answers
    assert nll(merged) == pytest.approx(nll(adapted), rel=1e-3)
    assert not (tmp_path / "merged" / "adapter_config.json").exists()


def test_cli_adapt_and_export_of_an_adapter_folder(tiny_model_dir, labelled, tmp_path):
    from distil.deploy.adapt import adapt
    from distil.deploy.export import export_model, load_source
    from distil.deploy.scoring import compare_with_source

    proc = run_cli("adapt", "--model", str(tiny_model_dir), "--data", str(labelled), "--out", str(tmp_path / "a"),
                   "--steps", "4", "--batch-size", "4")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout[proc.stdout.index("{"):])["steps"] == 4
    assert (tmp_path / "a" / "adapter_config.json").exists()
    # export merges an adapter folder into a plain model, checked against peft's own forward.
    plain = export_model(tmp_path / "a", "hf", tmp_path / "plain")
    assert not (plain.path / "adapter_config.json").exists()
    assert compare_with_source(tmp_path / "a", plain.path, load_source(tmp_path / "a")[1])["max_abs_logit_diff"] < 1e-4

    bad = write_jsonl(tmp_path / "unlabelled.jsonl", [{"prompt": "hello ?"}])
    with pytest.raises(DistilError, match='unlabelled.jsonl:1: field "reference"'):
        adapt(tiny_model_dir, bad, tmp_path / "b")
