"""Every export format loaded back in its own runtime and compared with the source model.

Tolerances (the tiny models' logits are of order 1-5):
  - hf: identical logits (the same float32 tensors);
  - GGUF: within 1e-4 of the source with its weights rounded as the file stores them
    (float16, or gguf's q8_0: blocks of 32 int8 weights with one float16 scale), and within
    1% (f16) / 10% (q8_0) of the largest source logit of the float32 source itself;
  - ONNX: < 1e-4 (float32 throughout; only operator order differs), and identical greedy text;
  - int8: the stored file reproduces the in-memory quantized model exactly, and stays within
    1.0 of the float32 logits (dynamic int8 rounds weights and activations).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import run_cli

from distil.data.splits import load_data
from distil.deploy.export import export_model, load_int8
from distil.models.sources import size_on_disk
from distil.deploy.runtimes import OnnxRuntime, TorchRuntime, greedy
from distil.errors import DistilError
from distil.generation.view import TeacherPrompts, cached_rows

TEXT = "what is the best way to learn a new language quickly ? tell me about stars 123 and moons"


def _logits(model, ids: list[int]) -> torch.Tensor:
    with torch.inference_mode():
        return model(torch.tensor([ids])).logits[0].float()


def _source(folder):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval(), AutoTokenizer.from_pretrained(folder)


def test_hf_export_is_the_same_model(tiny_model_dir, tmp_path):
    model, tokenizer = _source(tiny_model_dir)
    artifact = export_model(tiny_model_dir, "hf", tmp_path / "hf")
    copy, _ = _source(artifact.path)
    ids = tokenizer(TEXT)["input_ids"]
    assert torch.equal(_logits(copy, ids), _logits(model, ids))
    assert (artifact.path / "model.safetensors").exists() and not list(artifact.path.glob("*.bin"))


def _rounded(model, quant: str):
    """A copy of `model` whose 2-D weights went through float16 or gguf's own q8_0 round trip."""
    import copy

    import gguf

    rounded = copy.deepcopy(model)
    with torch.no_grad():
        for p in rounded.parameters():
            if p.ndim != 2:
                continue
            if quant == "q8_0" and p.shape[-1] % 32 == 0:
                q = gguf.quants.quantize(p.numpy(), gguf.GGMLQuantizationType.Q8_0)
                p.copy_(torch.from_numpy(gguf.quants.dequantize(q, gguf.GGMLQuantizationType.Q8_0)))
            else:
                p.copy_(p.half().float())
    return rounded


@pytest.mark.parametrize("quant,tolerance", [("f16", 0.01), ("q8_0", 0.1)])
def test_gguf_reads_back_in_gguf_and_transformers(bpe_model_dir, tmp_path, distil_home, quant, tolerance):
    import gguf

    from distil.models.sources import load_tokenizer, resolve

    model, tokenizer = _source(bpe_model_dir)
    artifact = export_model(bpe_model_dir, "gguf", tmp_path / f"m-{quant}.gguf", quant)

    # gguf's own reader: llama metadata, llama.cpp tensor names and types, the tokenizer.
    reader = gguf.GGUFReader(artifact.path)
    assert reader.fields["general.architecture"].contents() == "llama"
    assert reader.fields["llama.block_count"].contents() == 4
    assert reader.fields["tokenizer.ggml.model"].contents() == "gpt2"
    assert reader.fields["tokenizer.ggml.pre"].contents() == "gpt-2"
    assert len(reader.fields["tokenizer.ggml.tokens"].contents()) == len(tokenizer)
    assert reader.fields["tokenizer.ggml.eos_token_id"].contents() == tokenizer.eos_token_id
    assert reader.fields["tokenizer.ggml.add_bos_token"].contents() is False
    tensors = {t.name: t for t in reader.tensors}
    assert "output.weight" not in tensors  # tied embeddings: llama.cpp reuses token_embd
    assert {"token_embd.weight", "output_norm.weight", "blk.3.attn_q.weight", "blk.3.ffn_down.weight"} <= set(tensors)
    two_d = gguf.GGMLQuantizationType.Q8_0 if quant == "q8_0" else gguf.GGMLQuantizationType.F16
    assert tensors["blk.0.ffn_up.weight"].tensor_type == two_d
    assert tensors["blk.0.attn_norm.weight"].tensor_type == gguf.GGMLQuantizationType.F32
    embedding = gguf.quants.dequantize(tensors["token_embd.weight"].data, tensors["token_embd.weight"].tensor_type)
    source_embedding = model.get_input_embeddings().weight.detach().numpy()
    assert np.abs(embedding.reshape(source_embedding.shape) - source_embedding).max() < tolerance / 10

    # distil's own GGUF loader (transformers dequantizes it into a model folder): same logits, same tokens.
    resolved = resolve(str(artifact.path))
    loaded, _ = _source(resolved.directory)
    ids = tokenizer(TEXT)["input_ids"]
    diff = (_logits(loaded, ids) - _logits(model, ids)).abs().max().item()
    assert diff < tolerance * _logits(model, ids).abs().max().item(), f"{quant}: max |logit diff| {diff}"
    # ... and exactly the source with its weights rounded the way the file stores them.
    rounded = _rounded(model, quant)
    assert (_logits(loaded, ids) - _logits(rounded, ids)).abs().max().item() < 1e-4
    assert load_tokenizer(resolved.directory)(TEXT)["input_ids"] == ids


@pytest.mark.parametrize("quant,tolerance", [("f16", 0.02), ("q8_0", 0.1)])
def test_gguf_runs_in_llama_cpp_itself(bpe_model_dir, tmp_path, quant, tolerance):
    """llama.cpp (llama-cpp-python, the `llama` extra, built from source) loads the export, tokenizes
    like the HF tokenizer, and gives the logits of the source with its weights rounded as stored."""
    llama_cpp = pytest.importorskip("llama_cpp")
    model, tokenizer = _source(bpe_model_dir)
    artifact = export_model(bpe_model_dir, "gguf", tmp_path / f"m-{quant}.gguf", quant)
    llm = llama_cpp.Llama(str(artifact.path), n_ctx=128, logits_all=True, n_threads=1, verbose=False)
    ids = tokenizer(TEXT)["input_ids"]
    assert llm.tokenize(TEXT.encode(), add_bos=False, special=False) == ids
    llm.eval(ids)
    got = torch.from_numpy(np.array(llm.scores[: len(ids)], dtype=np.float32))
    want = _logits(_rounded(model, quant), ids)
    # llama.cpp multiplies in its own precision (f16; q8_0 also rounds the activations to 8 bits):
    # 0.5% (f16) and 4.4% (q8_0) of the largest logit here
    assert (got - want).abs().max().item() < tolerance * want.abs().max().item()
    assert (got.argmax(-1) == want.argmax(-1)).float().mean().item() >= 0.9


def test_gguf_exports_are_scored_and_timed_in_llama_cpp(bpe_model_dir, tmp_path):
    """With the `llama` extra, a GGUF row of the report is llama.cpp's own numbers, one row at a time."""
    pytest.importorskip("llama_cpp")
    from distil.deploy.runtimes import LlamaCppRuntime, open_runtime
    from distil.deploy.scoring import evaluate_runtime

    model, tokenizer = _source(bpe_model_dir)
    runtime = open_runtime(export_model(bpe_model_dir, "gguf", tmp_path / "m.gguf", "f16").path)
    assert isinstance(runtime, LlamaCppRuntime) and runtime.max_rows == 1
    prompts = [tokenizer(p)["input_ids"] for p in ("how do you cook rice ?", "tell me about stars and planets and moons")]
    kwargs = dict(max_new_tokens=8, stop_ids=set(), pad_id=tokenizer.pad_token_id)
    assert greedy(runtime, prompts[:1], **kwargs) == greedy(TorchRuntime(model), prompts[:1], **kwargs)
    with pytest.raises(DistilError, match="one row at a time"):
        greedy(runtime, prompts, **kwargs)
    # rows whose "teacher" is the source model itself: its top-8 log-probs on its own greedy text
    rows = []
    for ids, out in zip(prompts, greedy(TorchRuntime(model), prompts, **kwargs)):
        logp = torch.log_softmax(_logits(model, ids + out)[len(ids) - 1:-1], -1)
        top = logp.topk(8)
        rows.append({"prompt_ids": ids, "token_ids": out, "topk_ids": top.indices.tolist(),
                     "topk_logprobs": top.values.tolist(),
                     "tail_logprob": torch.log1p(-top.values.exp().sum(-1).clamp(max=1 - 1e-6)).tolist()})
    args = dict(rows=rows, references=["rice and stars", "moons"], stop_ids={tokenizer.eos_token_id},
                max_new_tokens=8, speed_prompts=2)
    source = evaluate_runtime(TorchRuntime(model), tokenizer, **args)
    shipped = evaluate_runtime(runtime, tokenizer, **args)
    assert source["metrics"]["top1_agreement"] == 1.0 and shipped["metrics"]["top1_agreement"] >= 0.9
    assert shipped["metrics"]["teacher_kl"] < 0.01 and shipped["speed"]["value"] > 0
    assert shipped["metrics"]["perplexity"] == pytest.approx(source["metrics"]["perplexity"], rel=0.02)


def test_gguf_refuses_a_tokenizer_llama_cpp_cannot_reproduce(tiny_model_dir, tmp_path):
    with pytest.raises(DistilError, match="tokenizer.*WordLevel"):
        export_model(tiny_model_dir, "gguf", tmp_path / "m.gguf")
    assert not (tmp_path / "m.gguf").exists()


@pytest.mark.slow
def test_onnx_with_kv_cache_matches_transformers(tiny_model_dir, tmp_path):
    model, tokenizer = _source(tiny_model_dir)
    artifact = export_model(tiny_model_dir, "onnx", tmp_path / "onnx")
    runtime = OnnxRuntime(artifact.path)
    names = [i.name for i in runtime.session.get_inputs()]
    assert names[:3] == ["input_ids", "attention_mask", "position_ids"] and "past_key_values.3.value" in names

    ids = tokenizer(TEXT)["input_ids"]
    full, _ = runtime.forward(torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.long),
                              torch.arange(len(ids))[None], None)
    assert (full[0] - _logits(model, ids)).abs().max().item() < 1e-4
    # Feeding the cache back: prompt in one call, then one token per call.
    _, past = runtime.forward(torch.tensor([ids[:-1]]), torch.ones(1, len(ids) - 1, dtype=torch.long),
                              torch.arange(len(ids) - 1)[None], None)
    step, _ = runtime.forward(torch.tensor([ids[-1:]]), torch.ones(1, len(ids), dtype=torch.long),
                              torch.tensor([[len(ids) - 1]]), past)
    assert (step[0, -1] - full[0, -1]).abs().max().item() < 1e-4

    prompts = [tokenizer(p)["input_ids"] for p in ("how do you cook rice ?", "tell me about stars and planets and moons")]
    kwargs = dict(max_new_tokens=8, stop_ids=set(), pad_id=tokenizer.pad_token_id)
    assert greedy(runtime, prompts, **kwargs) == greedy(TorchRuntime(model), prompts, **kwargs)
    for p in prompts:  # and transformers' own generate, batch 1, stopping at end of turn
        with torch.inference_mode():
            expected = model.generate(torch.tensor([p]), max_new_tokens=8, do_sample=False,
                                      pad_token_id=tokenizer.pad_token_id)[0, len(p):].tolist()
        assert greedy(runtime, [p], **{**kwargs, "stop_ids": {tokenizer.eos_token_id}})[0] == expected


def test_int8_is_stored_without_pickle_and_reloads_exactly(tiny_model_dir, tmp_path):
    from safetensors import safe_open

    from distil.deploy.export import INT8_WEIGHTS, quantize_dynamic

    model, tokenizer = _source(tiny_model_dir)
    artifact = export_model(tiny_model_dir, "int8", tmp_path / "int8")
    assert sorted(p.name for p in artifact.path.glob("*.safetensors")) == [INT8_WEIGHTS]
    assert not [p for p in artifact.path.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".pkl")]
    with safe_open(artifact.path / INT8_WEIGHTS, "pt") as f:
        assert f.get_tensor("model.layers.0.mlp.up_proj.qweight").dtype == torch.int8
        assert "model.embed_tokens.weight" not in f.keys()  # tied: rebuilt from the int8 head
    assert size_on_disk(artifact.path) < size_on_disk(tiny_model_dir)

    ids = tokenizer(TEXT)["input_ids"]
    loaded = _logits(load_int8(artifact.path), ids)
    in_memory = quantize_dynamic(_source(tiny_model_dir)[0])
    with torch.no_grad():  # the in-memory model with the same int8 table as input embedding
        in_memory.model.embed_tokens.weight.copy_(in_memory.lm_head._weight_bias()[0].dequantize())
    assert torch.allclose(loaded, _logits(in_memory, ids), atol=1e-6)
    assert (loaded - _logits(model, ids)).abs().max().item() < 1.0


def test_bad_format_and_quant_are_one_clear_error(tiny_model_dir, tmp_path):
    with pytest.raises(DistilError, match='field "format".*unknown format'):
        export_model(tiny_model_dir, "tflite", tmp_path / "x")
    with pytest.raises(DistilError, match='field "quant"'):
        export_model(tiny_model_dir, "onnx", tmp_path / "x", "q8_0")
    with pytest.raises(DistilError, match="model folder not found"):
        export_model(tmp_path / "missing", "hf", tmp_path / "x")


def test_cli_export_checks_the_artifact_against_the_source(tiny_model_dir, tmp_path):
    proc = run_cli("export", "--model", str(tiny_model_dir), "--format", "hf", "--out", str(tmp_path / "q"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout[proc.stdout.index("{"):])
    assert summary["format"] == "hf" and summary["size_bytes"] == size_on_disk(tmp_path / "q")
    # the same weights in the same runtime: the check must find no difference at all
    assert summary["check"]["max_abs_logit_diff"] == 0.0 and summary["check"]["top1_agreement"] == 1.0
    assert summary["check"]["positions"] > 5

    bad = run_cli("export", "--model", str(tiny_model_dir), "--format", "gguf", "--quant", "q4", "--out", str(tmp_path / "g"))
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert bad.stderr.strip().splitlines()[-1].startswith('error: field "quant": unknown GGUF quantization')


def test_recipe_export_section_adds_scored_rows_to_the_report(load, tmp_path, in_process_speed):
    from conftest import assert_valid_report

    from distil import pipeline

    recipe = load("export.formats=[hf, int8]", "train.baseline=false")
    pipeline.generate(recipe)
    pipeline.train(recipe)
    with pytest.raises(DistilError, match="run `distil eval` first"):
        pipeline.export(recipe)
    pipeline.evaluate(recipe)
    exports = pipeline.export(recipe)

    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["exports"] == json.loads(json.dumps(exports))
    assert_valid_report(report)
    reference = exports["reference"]
    metrics = {"token_f1", "top1_agreement", "teacher_kl", "perplexity", "perplexity_reference"}
    assert set(reference["metrics"]) == metrics and reference["speed"]["value"] > 0
    # The fp32 reference goes through the same runtime code as the exports, and agrees with `distil eval`'s scorer.
    from distil.evaluation.metrics import score_on_teacher_text, summarize
    from distil.models.sources import load_causal_lm

    _, eval_ex = load_data(recipe)
    view = TeacherPrompts(recipe)
    rows = cached_rows(recipe, view.keys(eval_ex), "held-out")
    expected = summarize(score_on_teacher_text(load_causal_lm(tmp_path / "out" / "student", device="cpu"), rows,
                                               pad_id=view.tokenizer.pad_token_id))
    for name in ("top1_agreement", "teacher_kl", "perplexity"):
        assert reference["metrics"][name] == pytest.approx(expected[name], rel=1e-4)
    hf, int8 = exports["rows"]
    assert (hf["label"], int8["label"]) == ("hf", "int8")
    for name in metrics:  # the hf export is the same model: no change at all
        assert hf["change"][name] == pytest.approx(0.0, abs=1e-6)
        assert int8["change"][name] == pytest.approx(int8["metrics"][name] - reference["metrics"][name])
    assert int8["size_bytes"] < hf["size_bytes"] and int8["speed"]["value"] > 0
    assert (tmp_path / "out" / "exports" / "student-int8" / "model.int8.safetensors").exists()
    assert "<h2>Exports</h2>" in (tmp_path / "out" / "report.html").read_text()


def test_recipe_export_formats_are_validated(load):
    with pytest.raises(DistilError, match='field "export.formats.0"'):
        load("export.formats=[tflite]")
    with pytest.raises(DistilError, match="export.quant"):
        load("export.quant=[q4_k]")
