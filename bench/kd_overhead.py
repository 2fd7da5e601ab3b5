"""What the cached soft targets cost: one KD training step against a plain cross-entropy step.

    python bench/kd_overhead.py --steps 20

The student is the quickstart's shape (SmolLM2-135M's config with 2 layers and 768 MLP
neurons: 49,152-token vocabulary, hidden 576, tied embeddings frozen as in the recipe),
randomly initialised; the batch is 8 rows of 32 prompt + 48 answer tokens with top-32 sparse
targets and a tail, like the quickstart's cache rows. Each step is forward + backward +
AdamW step + zero_grad, on the same batch:

- hf_ce: what a plain Hugging Face fine-tuning step does: `model(input_ids, labels=...)`,
  full logits at every position, cross-entropy on the answer tokens;
- ce: distil's objective with alpha = 1 (cross-entropy only, LM head at answer tokens only);
- kd: distil's objective as the quickstart runs it (alpha 0.1, sparse forward KL, T = 1);
- kd_t2: the same at temperature 2 (a second log-softmax).

Variants run interleaved (one step of each per round, order rotating) so drift in the machine's
load hits all of them alike; the number per variant is the median over rounds. Prints JSON and
a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from distil.data.batches import collate
from distil.training.objective import DistillationObjective

VARIANTS = ("hf_ce", "ce", "kd", "kd_t2")


def quickstart_student() -> LlamaForCausalLM:
    config = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=768, num_hidden_layers=2,
                         num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True,
                         max_position_embeddings=8192, rope_theta=100000.0, rms_norm_eps=1e-5)
    model = LlamaForCausalLM(config)
    model.get_input_embeddings().weight.requires_grad_(False)  # train.freeze_embeddings: true
    return model


def cache_rows(n: int, prompt_len: int, answer_len: int, k: int, vocab: int, seed: int) -> list[dict]:
    """Rows shaped like the teacher cache's: top-k log-probs that, with the tail, sum to one."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        logits = torch.randn(answer_len, k + 1, generator=g) * 2
        logp = torch.log_softmax(logits, dim=-1)
        topk_lp, order = logp[:, :k].sort(dim=-1, descending=True)
        rows.append({
            "prompt_ids": torch.randint(0, vocab, (prompt_len,), generator=g).tolist(),
            "token_ids": torch.randint(0, vocab, (answer_len,), generator=g).tolist(),
            "topk_ids": torch.stack([torch.randperm(vocab, generator=g)[:k] for _ in range(answer_len)]).tolist(),
            "topk_logprobs": topk_lp.tolist(),
            "tail_logprob": logp[:, k].tolist(),
        })
    return rows


def make_step(variant: str, model, batch, labels):
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5)
    if variant == "hf_ce":
        def loss_fn():
            return model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, labels=labels).loss
    else:
        alpha, temperature = {"ce": (1.0, 1.0), "kd": (0.1, 1.0), "kd_t2": (0.1, 2.0)}[variant]
        objective = DistillationObjective(model, alpha=alpha, temperature=temperature)
        n = batch.targets.numel()

        def loss_fn():
            return objective(batch)[0] / n

    def step():
        loss = loss_fn()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20, help="timed rounds (one step of every variant each)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--rows", type=int, default=8)
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--answer-tokens", type=int, default=48)
    parser.add_argument("--top-k", type=int, default=32)
    args = parser.parse_args()

    torch.manual_seed(0)
    model = quickstart_student()
    rows = cache_rows(args.rows, args.prompt_tokens, args.answer_tokens, args.top_k, model.config.vocab_size, seed=0)
    batch = collate(rows, pad_id=0)
    # Hugging Face's labels: the next token at each position, -100 (ignored) outside the answers.
    labels = torch.full_like(batch.input_ids, -100).flatten()
    labels[batch.target_pos] = batch.targets
    labels = torch.cat([torch.full((labels.numel() // batch.input_ids.shape[1], 1), -100),
                        labels.view(batch.input_ids.shape)[:, :-1]], dim=1)  # HF shifts labels left by one
    steps = {v: make_step(v, model, batch, labels) for v in VARIANTS}
    times = {v: [] for v in VARIANTS}
    for r in range(args.warmup + args.steps):
        order = VARIANTS[r % len(VARIANTS):] + VARIANTS[: r % len(VARIANTS)]
        for v in order:
            t = time.perf_counter()
            steps[v]()
            if r >= args.warmup:
                times[v].append(time.perf_counter() - t)
    median = {v: statistics.median(ts) for v, ts in times.items()}
    result = {
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
        "torch": torch.__version__, "rows": args.rows, "target_tokens": batch.targets.numel(),
        "seq_len": batch.input_ids.shape[1], "top_k": args.top_k, "rounds": args.steps,
        "median_step_s": {v: round(s, 4) for v, s in median.items()},
        "kd_over_ce": round(median["kd"] / median["ce"], 3),
        "kd_over_hf_ce": round(median["kd"] / median["hf_ce"], 3),
        "kd_t2_over_ce": round(median["kd_t2"] / median["ce"], 3),
    }
    print(json.dumps(result, indent=2))
    print("\n| step | median s | vs distil CE step | vs plain HF CE step |\n|---|---|---|---|")
    for v in VARIANTS:
        print(f"| {v} | {median[v]:.4f} | {median[v] / median['ce']:.3f}x | {median[v] / median['hf_ce']:.3f}x |")


if __name__ == "__main__":
    main()
