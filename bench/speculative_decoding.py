"""Speculative decoding on the quickstart teacher: tokens/s alone and with each draft, acceptance,
identical greedy output. One target (the teacher, dequantized), several drafts and draft lengths.

    python bench/speculative_decoding.py TEACHER_DIR RUN_DIR [RUN_DIR ...] [--n 16] [--new 48] [--k 2,3,4,6]
    python bench/speculative_decoding.py TEACHER_DIR --blocks   # cost of scoring 1-16 tokens, plain vs prepacked
    python bench/speculative_decoding.py TEACHER_DIR RUN_DIR --blocks   # also one llama.cpp step of each draft

Each RUN_DIR is a finished `distil run` (student/, and exports/*-q8_0.gguf if written, which then
also drafts from llama.cpp: the `llama` extra). Prompts: the first N of the shipped held-out set.
Every configuration times the teacher alone and with the draft prompt by prompt, alternating, so
a change of machine load hits both alike. Prints one JSON line per configuration.
"""
import argparse
import copy
import json
import statistics
import time
from pathlib import Path

import torch

from distil.data.examples import format_prompt, load_examples
from distil.deploy.speculate import LlamaCppDraft, TorchDraft, prepack_linears, speculate
from distil.models.sources import load_causal_lm, load_tokenizer
from distil.paths import shipped


@torch.inference_mode()
def block_ms(models: dict, prompt: list[int], token_counts: tuple[int, ...], repeats: int = 15) -> dict:
    """Median ms of one forward over N new tokens after a cached prompt (a verification pass), for
    each model and N. Every repeat runs every (model, N) once, so a change of machine load
    between them hits all alike, and the ratios between N hold even on a busy machine."""
    from transformers import DynamicCache

    caches = {}
    for name, model in models.items():
        caches[name] = DynamicCache()
        model(torch.tensor([prompt]), cache=caches[name], use_cache=True)
    times = {(name, n): [] for name in models for n in token_counts}
    for _ in range(repeats):
        for n in token_counts:
            for name, model in models.items():
                t0 = time.perf_counter()
                model(torch.tensor([prompt[:n]]), cache=caches[name], use_cache=True)
                times[(name, n)].append(time.perf_counter() - t0)
                caches[name].crop(-n)
    return {key: 1000 * statistics.median(t) for key, t in times.items()}


def draft_step_ms(draft: LlamaCppDraft, prompt: list[int], steps: int = 60) -> float:
    """Median ms of one single-token draft step after `prompt` (what each proposed token costs)."""
    draft.reset()
    draft.next_logits(prompt)
    times = []
    for token in prompt[:1] * steps:
        t0 = time.perf_counter()
        draft.next_logits([token])
        times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times)


def blocks(teacher: str, prompt: list[int], runs: list[Path]) -> None:
    plain = load_causal_lm(teacher, device="cpu")
    models = {"plain": plain, "prepacked": prepack_linears(copy.deepcopy(plain))}
    token_counts = (1, 2, 3, 4, 5, 8, 16)
    ms = block_ms(models, prompt, token_counts)
    for n in token_counts:
        print(json.dumps({"tokens": n, **{f"{name}_ms": round(ms[(name, n)], 1) for name in models},
                          "prepacked_vs_1_token": round(ms[("prepacked", n)] / ms[("prepacked", 1)], 2)}), flush=True)
    for run in runs:
        for gguf in sorted((run / "exports").glob("*q8_0.gguf")):
            print(json.dumps({"draft": str(gguf), "llama_cpp_step_ms": round(draft_step_ms(LlamaCppDraft(gguf, threads=2),
                                                                                              prompt), 2)}), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("teacher")
    parser.add_argument("runs", nargs="*")
    parser.add_argument("--blocks", action="store_true")
    parser.add_argument("--n", type=int, default=16)
    parser.add_argument("--new", type=int, default=48)
    parser.add_argument("--k", default="2,3,4,6")
    parser.add_argument("--runtimes", default="torch,llama.cpp")
    parser.add_argument("--min-confidence", default="0", help="comma-separated values to try")
    args = parser.parse_args()
    torch.set_num_threads(2)
    tokenizer = load_tokenizer(args.teacher)
    prompts = [tokenizer(format_prompt(tokenizer, ex.messages), add_special_tokens=False)["input_ids"]
               for ex in load_examples(shipped("data/quickstart/eval.jsonl"))[:args.n]]
    if args.blocks:
        return blocks(args.teacher, prompts[0], [Path(r) for r in args.runs])
    target = prepack_linears(load_causal_lm(args.teacher, device="cpu"))
    for run in map(Path, args.runs):
        drafts = {}
        if "torch" in args.runtimes:
            drafts["torch"] = TorchDraft(prepack_linears(load_causal_lm(run / "student", device="cpu")))
        ggufs = sorted((run / "exports").glob("*q8_0.gguf"))
        if "llama.cpp" in args.runtimes and ggufs:
            drafts["llama.cpp q8_0"] = LlamaCppDraft(ggufs[0], threads=2)
        for runtime, draft in drafts.items():
            for k, confidence in [(k, c) for k in map(int, args.k.split(","))
                                  for c in map(float, args.min_confidence.split(","))]:
                result = speculate(target, draft, prompts, max_new_tokens=args.new, draft_tokens=k,
                                   min_confidence=confidence)
                print(json.dumps({"draft": str(run), "runtime": runtime, **{key: result[key] for key in (
                    "draft_tokens", "min_confidence", "prompts", "identical_greedy_output", "acceptance_rate", "accepted_per_round",
                    "target_tokens_per_s", "speculative_tokens_per_s", "speedup", "draft_ms_per_round",
                    "verify_ms_per_round")}}), flush=True)


if __name__ == "__main__":
    main()
