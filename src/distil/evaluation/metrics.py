"""Per-row metrics on the teacher's text and references, summaries, retention and paired bootstrap intervals."""

from __future__ import annotations

import math

import numpy as np
import torch

from distil.data.batches import collate
from distil.training.losses import cross_entropy, sparse_forward_kl


@torch.inference_mode()
def score_on_teacher_text(model, rows: list[dict], *, pad_id: int, batch_size: int = 16) -> list[dict]:
    """Per row: tokens, top-1 agreements with the teacher, summed KL(teacher || model) and NLL."""
    results = []
    head = model.get_output_embeddings()
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        batch = collate(chunk, pad_id).to(model.device)
        hidden = model.base_model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).last_hidden_state
        results.extend(row_scores(head(hidden.flatten(0, 1)[batch.target_pos]).float(), batch, chunk))
    return results


def row_scores(logits, batch, chunk: list[dict]) -> list[dict]:
    """Per row of `chunk`: tokens, top-1 agreements, summed KL(teacher || model) and NLL, from the
    model's logits at the batch's target positions (any runtime's)."""
    agree = (logits.argmax(-1) == batch.topk_ids[:, 0]).float()
    kl = sparse_forward_kl(logits, batch.topk_ids, batch.topk_logprobs, batch.tail_logprob, reduction="none")
    nll = cross_entropy(logits, batch.targets, reduction="none")
    results, offset = [], 0
    for row in chunk:
        n = len(row["token_ids"])
        sl = slice(offset, offset + n)
        results.append({"n": n, "agree": agree[sl].sum().item(), "kl": kl[sl].sum().item(), "nll": nll[sl].sum().item()})
        offset += n
    return results


def reference_rows(cache_rows: list[dict], references: list[str | None], tokenizer) -> list[dict]:
    """Rows shaped like cache rows whose 'teacher text' is the reference answer (for its perplexity)."""
    out = []
    for row, ref in zip(cache_rows, references):
        if not ref:
            continue
        ids = tokenizer(ref, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        out.append({"prompt_ids": row["prompt_ids"], "token_ids": ids, "topk_ids": [[t] for t in ids],
                    "topk_logprobs": [[0.0]] * len(ids), "tail_logprob": [float("-inf")] * len(ids)})
    return out


def retention(teacher: float | None, model: float | None, higher_is_better: bool) -> float | None:
    """Model relative to teacher, oriented so 1.0 means as good as the teacher (None if undefined)."""
    if teacher is None or model is None:
        return None
    if higher_is_better:
        return model / teacher if teacher > 0 else None
    return teacher / model if model > 0 else None


def summarize(scores: list[dict]) -> dict:
    """Corpus-level agreement, KL and perplexity from per-row sums."""
    n = sum(s["n"] for s in scores)
    return {"top1_agreement": sum(s["agree"] for s in scores) / n, "teacher_kl": sum(s["kl"] for s in scores) / n,
            "perplexity": math.exp(sum(s["nll"] for s in scores) / n)}


# Per-row fields of `row_scores` and the corpus metric each one gives (a transform of its per-token mean).
LM_ROW_METRICS = {"top1_agreement": ("agree", None), "teacher_kl": ("kl", None), "perplexity": ("nll", np.exp)}


def paired_bootstrap(a: list[dict], b: list[dict] | None, metrics: dict | None = None, *, resamples: int = 2000,
                     seed: int = 0) -> dict[str, list[float]]:
    """95% intervals of metric(a) - metric(b) for each metric, resampling held-out rows with
    replacement, the same rows for both models (they were scored on the same rows); with `b`
    None, the intervals of metric(a) itself.

    A row is a dict of per-row sums and its weight "n" (tokens for a causal LM, 1 for an example);
    `metrics` maps a metric name to (row field, transform of sum(field) / sum(n) or None), by
    default the causal-LM ones (`LM_ROW_METRICS`). For classification a row is
    {"n": 1, "correct": 0/1, "agree": 0/1}, and {"accuracy": ("correct", None)} bootstraps accuracy.

    Tells whether a student-vs-baseline gap is larger than the choice of held-out rows explains.
    """
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(a), size=(resamples, len(a)))
    n = np.array([s["n"] for s in a], dtype=np.float64)[idx].sum(1)
    resampled = lambda rows, key: np.array([s[key] for s in rows], dtype=np.float64)[idx].sum(1) / n  # noqa: E731
    diffs = {}
    for metric, (key, transform) in (LM_ROW_METRICS if metrics is None else metrics).items():
        f = transform or (lambda x: x)
        diff = f(resampled(a, key)) - (0 if b is None else f(resampled(b, key)))
        diffs[metric] = [float(np.percentile(diff, 2.5)), float(np.percentile(diff, 97.5))]
    return diffs


RESAMPLED = "held-out rows, paired, 2000 times"


def metrics_block(values: dict[str, dict[str, float]], specs: dict[str, tuple[bool, str]],
                  intervals: dict[str, list[float]] | None = None) -> dict:
    """`metrics` of a report card, the same shape for every task.

    Args:
        values: role ("teacher", "student", "baseline") -> metric name -> value.
        specs: metric name -> (higher_is_better, description), in the order shown; a metric no
            role has is left out.
        intervals: metric name -> 95% paired-bootstrap interval of student - baseline.
    Returns:
        name -> {<role>: value, higher_is_better, description, retention, and with a baseline
        student_minus_baseline: {value, ci95, resampled} (ci95 where per-row scores gave one)}.
    """
    metrics = {}
    for name, (higher, description) in specs.items():
        if not any(name in v for v in values.values()):
            continue
        entry = {role: v.get(name) for role, v in values.items()}
        # a teacher's own "distance to itself" (KL 0) has no ratio to keep
        kept = None if not higher and not entry.get("teacher") else retention(entry.get("teacher"), entry.get("student"), higher)
        entry.update(higher_is_better=higher, description=description, retention=kept)
        if entry.get("baseline") is not None and entry.get("student") is not None:
            gap = {"value": entry["student"] - entry["baseline"]}
            if intervals and name in intervals:
                gap.update(ci95=intervals[name], resampled=RESAMPLED)
            entry["student_minus_baseline"] = gap
        metrics[name] = entry
    return metrics
