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


def paired_bootstrap(a: list[dict], b: list[dict], *, resamples: int = 2000, seed: int = 0) -> dict[str, list[float]]:
    """95% intervals of summarize(a)[m] - summarize(b)[m] for each metric, resampling held-out rows
    with replacement, the same rows for both models (they were scored on the same text).

    Tells whether a student-vs-baseline gap is larger than the choice of held-out rows explains.
    """
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(a), size=(resamples, len(a)))
    n = np.array([s["n"] for s in a], dtype=np.float64)[idx].sum(1)
    diffs = {}
    for key, metric in (("agree", "top1_agreement"), ("kl", "teacher_kl"), ("nll", "perplexity")):
        mean_a = np.array([s[key] for s in a], dtype=np.float64)[idx].sum(1) / n
        mean_b = np.array([s[key] for s in b], dtype=np.float64)[idx].sum(1) / n
        diff = np.exp(mean_a) - np.exp(mean_b) if key == "nll" else mean_a - mean_b
        diffs[metric] = [float(np.percentile(diff, 2.5)), float(np.percentile(diff, 97.5))]
    return diffs


