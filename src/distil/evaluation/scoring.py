"""Score teacher, student and baseline side by side, and write the report card.

Metrics on the held-out split:
  - distinct_answers: share of prompts whose greedy answer no other prompt's repeats (a student
    that ignores its prompts answers many of them alike; the headline says so);
  - token_f1: generated answer against `reference` (SQuAD-style token F1), where rows have one;
  - top1_agreement: the model's most likely next token equals the teacher's, on the teacher's
    held-out text;
  - teacher_kl: KL(teacher || model) over the cached top-k + tail buckets, same positions;
  - perplexity: on the teacher's held-out text; perplexity_reference: on the reference answers;
and per model: parameters, size on disk, tokens/s and latency (batch 1, greedy), peak memory.
"""

from __future__ import annotations

import collections
import datetime
import json
import math
import os
import platform
from pathlib import Path

import torch

from distil.data.quality import token_f1
from distil.errors import DistilError
from distil.evaluation.metrics import (metrics_block, paired_bootstrap, reference_rows, retention, score_on_teacher_text,
                                      summarize)
from distil.evaluation.report import write_report
from distil.generation.cache import TeacherCache
from distil.generation.decoding import generate_batch
from distil.generation.explain import final_answer


def generate_answers(model, tokenizer, rows: list[dict], *, max_new_tokens: int, batch_size: int, stop_ids) -> list[str]:
    """Greedy answers for the cached prompts, batched."""
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]["prompt_ids"]))
    texts: list[str] = [""] * len(rows)
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        gens = generate_batch(model, [rows[i]["prompt_ids"] for i in idx], pad_id=tokenizer.pad_token_id,
                              stop_ids=stop_ids, max_new_tokens=max_new_tokens, top_k=1)
        for i, g in zip(idx, gens):
            texts[i] = tokenizer.decode(g.token_ids, skip_special_tokens=True).strip()
    return texts


def evaluate_run(recipe, view, examples, rows: list[dict], teacher_rows: list[dict] | None = None) -> dict:
    """Score teacher, student and (if trained) baseline; write <out>/report.json and report.html.

    Args:
        recipe: the validated recipe.
        view: a `distil.generation.view.TeacherPrompts` (teacher source and tokenizer).
        examples: the held-out examples, aligned with `rows`.
        rows: their teacher-cache rows, as the student reads them (`view.student_rows`).
        teacher_rows: the same rows in the teacher's vocabulary, where it differs (cross-tokenizer).
    """
    from distil.evaluation.speed import measure_in_subprocess
    from distil.generation.decoding import stop_token_ids
    from distil.models.sources import count_params, load_causal_lm, size_on_disk
    from distil.progress import progress_bar

    out = recipe.out_dir
    teacher_rows = teacher_rows or rows
    cross = teacher_rows is not rows
    tokenizer = view.student_tokenizer
    pad_id = tokenizer.pad_token_id
    names = ["student"] + (["baseline"] if recipe.train.baseline and (out / "baseline").exists() else [])
    if not (out / "student").exists():
        raise DistilError("no trained student found; run `distil train` first", file=str(out / "student"))
    references = [ex.reference for ex in examples]
    ref_rows = reference_rows(rows, references, tokenizer)
    teacher_ref_rows = reference_rows(teacher_rows, references, view.tokenizer) if cross else ref_rows
    bs, new_tokens = recipe.eval.batch_size, recipe.eval.max_new_tokens or recipe.generate.max_new_tokens

    with progress_bar() as bar:
        # One unit per model scored, then one per model timed.
        task = bar.add_task("evaluate", total=2 * (1 + len(names)), status="teacher")
        teacher = view.load_model()
        stop_ids = stop_token_ids(tokenizer, teacher)
        scores = {"teacher": [{"n": len(r["token_ids"]), "agree": float(len(r["token_ids"])), "kl": 0.0,
                               "nll": -sum(r["token_logprobs"])} for r in teacher_rows]}
        ref_scores = {"teacher": score_on_teacher_text(teacher, teacher_ref_rows, pad_id=view.tokenizer.pad_token_id,
                                                       batch_size=bs)}
        answers = {"teacher": [r["text"] for r in teacher_rows]}
        info = {"teacher": {"name": view.source.name, "params": count_params(teacher),
                            "size_bytes": size_on_disk(view.source.directory), "path": str(view.source.directory)}}
        del teacher
        for name in names:
            bar.update(task, advance=1, status=name)
            model = load_causal_lm(out / name)
            if cross:  # the student ends its turn with its own tokens, not the teacher's
                stop_ids = stop_token_ids(tokenizer, model)
            scores[name] = score_on_teacher_text(model, rows, pad_id=pad_id, batch_size=bs)
            ref_scores[name] = score_on_teacher_text(model, ref_rows, pad_id=pad_id, batch_size=bs)
            answers[name] = generate_answers(model, tokenizer, rows, max_new_tokens=new_tokens, batch_size=bs,
                                             stop_ids=stop_ids)
            info[name] = {"name": name if name == "student" else "baseline (cross-entropy only)",
                          "params": count_params(model), "size_bytes": size_on_disk(out / name), "path": str(out / name)}
            del model

        n_speed = recipe.eval.speed_prompts
        for name, directory in [("teacher", view.source.directory)] + [(n, out / n) for n in names]:
            bar.update(task, advance=1, status=f"timing {name}")
            prompts = [r["prompt_ids"] for r in (teacher_rows if name == "teacher" else rows)[:n_speed]]
            info[name].update(measure_in_subprocess(str(directory), prompts))
        bar.update(task, advance=1, status="done")

    values: dict[str, dict[str, float]] = {}
    for name in info:
        values[name] = summarize(scores[name])
        if ref_rows:
            values[name]["perplexity_reference"] = math.exp(sum(s["nll"] for s in ref_scores[name]) / sum(s["n"] for s in ref_scores[name]))
        values[name].update(answer_metrics(answers[name], references))
        pairs = [(a, r) for a, r in zip(answers[name], references) if r]
        if recipe.generate.explain and pairs:  # the task metric on the final "Answer:" line alone
            finals = [final_answer(a) for a, _ in pairs]
            values[name]["answer_found"] = sum(f is not None for f in finals) / len(finals)
            values[name]["answer_f1"] = sum(token_f1(f or "", r) for f, (_, r) in zip(finals, pairs)) / len(pairs)
    metrics = metrics_block(values, LM_METRICS, _baseline_intervals(scores, answers, references))
    per_category = _per_category(examples, rows, scores, answers, references)
    compression = info["teacher"]["params"] / info["student"]["params"]
    speedup = info["student"]["speed"]["value"] / info["teacher"]["speed"]["value"]
    report = {
        "task": "causal_lm", "recipe": recipe.source, "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{os.cpu_count()} CPU cores, torch {torch.__version__}, {platform.machine()}",
        "headline": _headline(metrics, compression, speedup),
        "models": info, "compression": compression, "speedup": speedup, "metrics": metrics, "per_category": per_category,
        "eval_rows": len(rows),
        "cache": {"path": str(recipe.cache_dir), **TeacherCache(recipe.cache_dir).stats()},
    }
    if recipe.teachers is not None:  # several teachers: who wrote which rows, the student per teacher
        report["teachers"] = view.report(examples, rows, scores["student"])
    if (out / "teacher_usage.json").exists():  # an endpoint teacher: requests, tokens, estimated cost
        report["teacher_usage"] = json.loads((out / "teacher_usage.json").read_text())
    if cross:  # how much of the teacher's text the student learned as distributions (distil.models.alignment)
        report["cross_tokenizer"] = {"method": recipe.train.cross_tokenizer,
                                     "held_out_alignment": getattr(view, "alignment", None),
                                     "note": "teacher perplexity counts teacher tokens, the students' count "
                                             "student tokens: compare perplexities within one tokenizer only"}
    if (out / "data_quality.json").exists():  # rows kept and rejected by reason, per category (written by train)
        report["data"] = json.loads((out / "data_quality.json").read_text())
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "eval_answers.jsonl", "w") as f:
        for i, ex in enumerate(examples):
            f.write(json.dumps({"prompt": ex.messages[-1]["content"], "reference": ex.reference,
                                **{name: answers[name][i] for name in answers}}, ensure_ascii=False) + "\n")
    return write_report(report, out, recipe.eval.gates)


LM_METRICS = {
    "distinct_answers": (True, "share of held-out prompts whose greedy answer differs from every other prompt's"),
    "token_f1": (True, "token F1 of greedy answers against the reference"),
    "answer_f1": (True, "token F1 of the final 'Answer:' line against the reference (0 where none)"),
    "answer_found": (True, "share of answers that end with a parsable 'Answer:' line"),
    "top1_agreement": (True, "share of held-out teacher tokens where the model's top-1 token is the teacher's"),
    "teacher_kl": (False, "KL(teacher || model) per token over top-k + tail buckets, on held-out teacher text"),
    "perplexity": (False, "perplexity of the teacher's held-out answers"),
    "perplexity_reference": (False, "perplexity of the held-out reference answers"),
}


def _baseline_intervals(scores: dict, answers: dict, references: list[str | None]) -> dict[str, list[float]]:
    """95% paired-bootstrap intervals of student - baseline: over held-out rows of teacher text for
    agreement, KL and perplexity, over answered references for token F1."""
    if "baseline" not in scores:
        return {}
    intervals = paired_bootstrap(scores["student"], scores["baseline"])
    with_ref = [i for i, r in enumerate(references) if r]
    if with_ref:
        f1 = {name: [{"n": 1, "f1": token_f1(answers[name][i], references[i])} for i in with_ref]
              for name in ("student", "baseline")}
        intervals.update(paired_bootstrap(f1["student"], f1["baseline"], {"token_f1": ("f1", None)}))
    return intervals


def _per_category(examples, rows, scores, answers, references) -> dict:
    """Retention of token F1 and top-1 agreement within each category (when rows have one)."""
    groups: dict[str, list[int]] = collections.defaultdict(list)
    for i, ex in enumerate(examples):
        if ex.category:
            groups[ex.category].append(i)
    result = {}
    for category, idx in sorted(groups.items()):
        entry = {"n": len(idx), "retention": {}}
        agree = {name: sum(scores[name][i]["agree"] for i in idx) / sum(scores[name][i]["n"] for i in idx) for name in ("teacher", "student")}
        entry["retention"]["top1_agreement"] = agree["student"]
        with_ref = [i for i in idx if references[i]]
        if with_ref:
            f1 = {name: sum(token_f1(answers[name][i], references[i]) for i in with_ref) / len(with_ref) for name in ("teacher", "student")}
            entry["retention"]["token_f1"] = retention(f1["teacher"], f1["student"], True)
        result[category] = entry
    return result


def answer_metrics(answers: list[str], references: list[str | None]) -> dict[str, float]:
    """Greedy answers' distinct share and, where references exist, their mean token F1 against them."""
    out = {"distinct_answers": distinct_share(answers)}
    pairs = [(a, r) for a, r in zip(answers, references) if r]
    if pairs:
        out["token_f1"] = sum(token_f1(a, r) for a, r in pairs) / len(pairs)
    return out


def distinct_share(answers: list[str]) -> float:
    """Share of answers that no other answer repeats (compared lowercased, whitespace collapsed):
    a student that answers many prompts with the same sentence ignores them, whatever its token F1."""
    if not answers:
        return 0.0
    counts = collections.Counter(" ".join(a.lower().split()) for a in answers)
    return sum(counts[" ".join(a.lower().split())] == 1 for a in answers) / len(answers)


# The headline warns when the student's answers are distinct this much less often than the teacher's.
DISTINCT_WARNING_RATIO = 0.9


def _headline(metrics: dict, compression: float, speedup: float) -> str:
    parts = []
    if "token_f1" in metrics and metrics["token_f1"]["retention"] is not None:
        parts.append(f"keeps {metrics['token_f1']['retention']:.0%} of the teacher's token F1")
    if "top1_agreement" in metrics:
        parts.append(f"agrees with the teacher on {metrics['top1_agreement']['student']:.0%} of next tokens")
    line = f"The student {' and '.join(parts)}, at {compression:.1f}x fewer parameters and {speedup:.1f}x the teacher's tokens/s."
    distinct = metrics.get("distinct_answers")
    if distinct and distinct["student"] < DISTINCT_WARNING_RATIO * distinct["teacher"]:
        line += (f" But only {distinct['student']:.0%} of its held-out answers are distinct (the teacher's: "
                 f"{distinct['teacher']:.0%}): it gives many prompts the same answer, so it does not follow them yet.")
    return line
