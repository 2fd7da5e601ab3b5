"""Score and time exported artifacts with the student's metrics, and add them to the report.

Every artifact, and the fp32 student it came from, goes through the same code
(`distil.deploy.runtimes`): the same held-out teacher text for top-1 agreement, KL and perplexity,
the same greedy answers for token F1, the same batch-1 timing. Each row then carries each
metric's change against the fp32 student, so "int8 costs 0.02 agreement" is read directly.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch

from distil.data.batches import collate
from distil.data.quality import token_f1
from distil.deploy.runtimes import TorchRuntime, greedy, open_runtime
from distil.errors import DistilError
from distil.evaluation.metrics import reference_rows, row_scores, summarize
from distil.evaluation.report import write_report
from distil.models.sources import size_on_disk

HIGHER_IS_BETTER = {"token_f1": True, "top1_agreement": True, "teacher_kl": False, "perplexity": False,
                    "perplexity_reference": False}


@torch.inference_mode()
def score_rows(runtime, rows: list[dict], *, pad_id: int, batch_size: int = 4) -> list[dict]:
    """Per row: tokens, top-1 agreements with the teacher, summed KL(teacher || model) and NLL."""
    results = []
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        batch = collate(chunk, pad_id)
        positions = torch.arange(batch.input_ids.shape[1])[None].expand_as(batch.input_ids)
        logits, _ = runtime.forward(batch.input_ids, batch.attention_mask, positions, None)
        results.extend(row_scores(logits.flatten(0, 1)[batch.target_pos].float(), batch, chunk))
    return results


def tokens_per_s(runtime, prompts: list[list[int]], *, max_new_tokens: int = 32, pad_id: int = 0) -> float:
    """Batch-1 greedy decoding speed: `max_new_tokens` per prompt (no early stop), after one warm-up."""
    kwargs = dict(max_new_tokens=max_new_tokens, stop_ids=set(), pad_id=pad_id, stop_early=False)
    greedy(runtime, [prompts[0]], **kwargs)
    t0 = time.perf_counter()
    for ids in prompts:
        greedy(runtime, [ids], **kwargs)
    return len(prompts) * max_new_tokens / (time.perf_counter() - t0)


def evaluate_runtime(runtime, tokenizer, rows: list[dict], references: list[str | None], *, stop_ids: set[int],
                     max_new_tokens: int, speed_prompts: int, batch_size: int = 4, timed: bool = True) -> dict:
    """The student's metrics for one runtime, plus its speed in tokens/s (None when `timed` is False)."""
    pad_id = tokenizer.pad_token_id
    batch_size = min(batch_size, runtime.max_rows or batch_size)
    greedy_rows = runtime.max_rows or batch_size * 4
    values = summarize(score_rows(runtime, rows, pad_id=pad_id, batch_size=batch_size))
    ref_rows = reference_rows(rows, references, tokenizer)
    if ref_rows:
        ref = score_rows(runtime, ref_rows, pad_id=pad_id, batch_size=batch_size)
        values["perplexity_reference"] = math.exp(sum(s["nll"] for s in ref) / sum(s["n"] for s in ref))
    with_ref = [(r, ref) for r, ref in zip(rows, references) if ref]
    if with_ref:
        order = sorted(range(len(with_ref)), key=lambda i: len(with_ref[i][0]["prompt_ids"]))
        f1 = 0.0
        for start in range(0, len(order), greedy_rows):
            idx = order[start:start + greedy_rows]
            outs = greedy(runtime, [with_ref[i][0]["prompt_ids"] for i in idx], max_new_tokens=max_new_tokens,
                          stop_ids=stop_ids, pad_id=pad_id)
            for i, ids in zip(idx, outs):
                f1 += token_f1(tokenizer.decode(ids, skip_special_tokens=True).strip(), with_ref[i][1])
        values["token_f1"] = f1 / len(with_ref)
    speed = None
    if timed:
        speed = {"value": tokens_per_s(runtime, [r["prompt_ids"] for r in rows[:speed_prompts]], pad_id=pad_id),
                 "unit": "tokens/s"}
    return {"metrics": values, "speed": speed}


def evaluate_artifacts(student_dir: Path, artifacts: list, tokenizer, rows: list[dict], references: list[str | None],
                       *, stop_ids: set[int], max_new_tokens: int, speed_prompts: int) -> dict:
    """Rows for the fp32 student and each `distil.deploy.export.Exported`, with changes against the student.

    Returns {"reference": the fp32 student's row, "rows": one per artifact, "note": how it was measured}.
    """
    from distil.models.sources import load_causal_lm

    kwargs = dict(stop_ids=stop_ids, max_new_tokens=max_new_tokens, speed_prompts=speed_prompts)
    student = TorchRuntime(load_causal_lm(student_dir, device="cpu"))
    reference = {"label": "student (fp32)", "format": "hf", "runtime": "torch", "path": str(student_dir),
                 "size_bytes": size_on_disk(student_dir), **evaluate_runtime(student, tokenizer, rows, references, **kwargs)}
    del student
    out = []
    for artifact in artifacts:
        runtime = open_runtime(artifact.path)
        # transformers runs a GGUF file dequantized to fp32: its metrics are the file's, its speed is not llama.cpp's.
        timed = not (artifact.format == "gguf" and isinstance(runtime, TorchRuntime))
        result = evaluate_runtime(runtime, tokenizer, rows, references, timed=timed, **kwargs)
        row = {"label": artifact.label, "format": artifact.format, "quant": artifact.quant, "path": str(artifact.path),
               "runtime": "onnxruntime" if artifact.format == "onnx" else runtime.name,
               "size_bytes": artifact.size_bytes, **result}
        del runtime
        row["change"] = {m: row["metrics"][m] - reference["metrics"][m] for m in row["metrics"] if m in reference["metrics"]}
        if timed and reference["speed"]:
            row["speedup_vs_student"] = row["speed"]["value"] / reference["speed"]["value"]
        out.append(row)
    note = (f"Measured in one process, one model at a time, on {torch.get_num_threads()} torch threads: metrics on "
            f"{len(rows)} held-out rows; tokens/s = batch-1 greedy, 32 new tokens, {speed_prompts} prompts. "
            "GGUF files run in llama.cpp where the `llama` extra is installed; otherwise they are scored "
            "through transformers' GGUF loader (dequantized) and their speed is not measured.")
    return {"reference": reference, "rows": out, "note": note, "higher_is_better": HIGHER_IS_BETTER}


def add_to_report(out_dir: Path, exports: dict) -> None:
    """Store the export rows in <out>/report.json (key "exports") and re-render report.html, for any task."""
    path = Path(out_dir) / "report.json"
    if not path.exists():
        raise DistilError("no report to add the exports to; run `distil eval` first", file=str(path))
    report = json.loads(path.read_text())
    report["exports"] = exports
    write_report(report, Path(out_dir))


PROBE = "Tell me about the stars and the moon."


@torch.inference_mode()
def compare_with_source(source_dir: Path, artifact_path: Path, tokenizer, text: str = PROBE) -> dict:
    """Next-token logits of the artifact against the fp32 source on one chat-formatted prompt.

    Returns the largest absolute logit difference over every position and whether the top-1
    token agrees at each position, so `distil export` can show the artifact still is the model.
    """
    from distil.data.examples import format_prompt
    from distil.models.sources import load_causal_lm

    prompt = format_prompt(tokenizer, [{"role": "user", "content": text}], None)
    ids = torch.tensor([tokenizer(prompt, add_special_tokens=False)["input_ids"]])
    mask, positions = torch.ones_like(ids), torch.arange(ids.shape[1])[None]
    if (Path(source_dir) / "adapter_config.json").exists():  # peft's own forward, adapters not merged
        from distil.models.lora import load_with_adapters

        source_model = load_with_adapters(source_dir)
    else:
        source_model = load_causal_lm(source_dir, device="cpu")
    source, _ = TorchRuntime(source_model).forward(ids, mask, positions, None)
    artifact, _ = open_runtime(artifact_path).forward(ids, mask, positions, None)
    return {"positions": ids.shape[1], "max_abs_logit_diff": (artifact - source).abs().max().item(),
            "top1_agreement": (artifact.argmax(-1) == source.argmax(-1)).float().mean().item()}
