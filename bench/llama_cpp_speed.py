"""Batch-1 greedy tokens/s of the quickstart student's GGUF exports in llama.cpp itself, beside
the fp32 student and teacher in torch (distil's runtime), round-robin, median of 3 rounds.

Needs llama-cpp-python (the `llama` extra; it builds llama.cpp from source, ~7-13 minutes here).

    python bench/llama_cpp_speed.py RUN_DIR    # RUN_DIR: a finished quickstart run (student/)

Writes the GGUF files to RUN_DIR/exports if they are not there. Same 4 held-out prompts and
32 new tokens for every model; both runtimes use 2 threads.
"""
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

from distil.config.loading import load_recipe
from distil.data.splits import load_data
from distil.deploy.export import export_model
from distil.deploy.runtimes import open_runtime
from distil.deploy.scoring import tokens_per_s
from distil.deploy.speculate import LlamaCppDraft
from distil.generation.view import TeacherPrompts, cached_rows

NEW_TOKENS, THREADS = 32, 2


def llama_tokens_per_s(llm: LlamaCppDraft, prompts: list[list[int]]) -> float:
    """Greedy decoding, every prompt to NEW_TOKENS tokens (no early stop), after one warm-up, as
    distil.deploy_eval.tokens_per_s does for the torch runtimes."""
    def decode(ids: list[int]) -> None:
        llm.reset()
        llm.propose(ids, NEW_TOKENS)  # a draft's proposal is plain greedy decoding

    decode(prompts[0])
    start = time.perf_counter()
    for ids in prompts:
        decode(ids)
    return len(prompts) * NEW_TOKENS / (time.perf_counter() - start)


def main(run: Path) -> dict:
    recipe = load_recipe(Path(__file__).resolve().parents[1] / "recipes" / "quickstart.yaml", [f"out={run}"])
    _, held_out = load_data(recipe)
    view = TeacherPrompts(recipe)
    prompts = [r["prompt_ids"] for r in cached_rows(recipe, view.keys(held_out), "held-out")[:4]]
    torch.set_num_threads(THREADS)
    ggufs = {}
    for quant in ("f16", "q8_0"):
        path = run / "exports" / f"student-gguf-{quant}.gguf"
        if not path.exists():
            export_model(run / "student", "gguf", path, quant)
        ggufs[f"student gguf {quant} (llama.cpp)"] = LlamaCppDraft(path, threads=THREADS, context=512)
    torch_models = {"teacher fp32 (torch)": open_runtime(view.source.directory),
                    "student fp32 (torch)": open_runtime(run / "student")}
    results = {name: [] for name in [*torch_models, *ggufs]}
    for round_ in range(3):
        for name, runtime in torch_models.items():
            results[name].append(tokens_per_s(runtime, prompts, pad_id=view.tokenizer.pad_token_id,
                                              max_new_tokens=NEW_TOKENS))
        for name, llm in ggufs.items():
            results[name].append(llama_tokens_per_s(llm, prompts))
        print(round_, {k: round(v[-1], 1) for k, v in results.items()}, "load", os.getloadavg(), flush=True)
    return {name: {"median": round(statistics.median(v), 1), "all": [round(x, 1) for x in v]}
            for name, v in results.items()}


if __name__ == "__main__":
    print(json.dumps(main(Path(sys.argv[1]).resolve()), indent=1))
