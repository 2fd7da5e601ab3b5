"""Speculative decoding on the quickstart teacher: tokens/s alone and with each draft, acceptance,
identical greedy output. One target (the teacher, dequantized), several drafts and draft lengths.

    python bench/speculative_decoding.py TEACHER_DIR RUN_DIR [RUN_DIR ...] [--n 16] [--new 48] [--k 2,3,4,6]

Each RUN_DIR is a finished `distil run` (student/, and exports/*-q8_0.gguf if written, which then
also drafts from llama.cpp: the `llama` extra). Prompts: the first N of the shipped held-out set.
Every configuration times the teacher alone and with the draft prompt by prompt, alternating, so
a change of machine load hits both alike. Prints one JSON line per configuration.
"""
import argparse
import json
from pathlib import Path

import torch

from distil.data import format_prompt, load_examples
from distil.models import load_causal_lm, load_tokenizer
from distil.paths import shipped
from distil.speculate import LlamaCppDraft, TorchDraft, prepack_linears, speculate


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("teacher")
    parser.add_argument("runs", nargs="+")
    parser.add_argument("--n", type=int, default=16)
    parser.add_argument("--new", type=int, default=48)
    parser.add_argument("--k", default="2,3,4,6")
    parser.add_argument("--runtimes", default="torch,llama.cpp")
    args = parser.parse_args()
    torch.set_num_threads(2)
    tokenizer = load_tokenizer(args.teacher)
    prompts = [tokenizer(format_prompt(tokenizer, ex.messages), add_special_tokens=False)["input_ids"]
               for ex in load_examples(shipped("data/quickstart/eval.jsonl"))[:args.n]]
    target = prepack_linears(load_causal_lm(args.teacher, device="cpu"))
    for run in map(Path, args.runs):
        drafts = {}
        if "torch" in args.runtimes:
            drafts["torch"] = TorchDraft(prepack_linears(load_causal_lm(run / "student", device="cpu")))
        ggufs = sorted((run / "exports").glob("*q8_0.gguf"))
        if "llama.cpp" in args.runtimes and ggufs:
            drafts["llama.cpp q8_0"] = LlamaCppDraft(ggufs[0], threads=2)
        for runtime, draft in drafts.items():
            for k in map(int, args.k.split(",")):
                result = speculate(target, draft, prompts, max_new_tokens=args.new, draft_tokens=k)
                print(json.dumps({"draft": str(run), "runtime": runtime, **{key: result[key] for key in (
                    "draft_tokens", "prompts", "identical_greedy_output", "acceptance_rate", "accepted_per_round",
                    "target_tokens_per_s", "speculative_tokens_per_s", "speedup")}}), flush=True)


if __name__ == "__main__":
    main()
