"""Peak memory of forward KL at SmolLM2's vocabulary: naive full logits vs `chunked_divergence`.

    python bench/loss_memory.py --tokens 2048 --vocab 49152 --hidden 576 --chunk-tokens 64,128,256

Variants, each forward + backward of forward KL(p_t || p_s) at temperature 1, fp32, CPU:
- naive: student logits (N, V) = hidden @ W.T and teacher logits (N, V) = teacher_hidden @ W_t.T
  are both materialised, then `forward_kl`, then backward;
- chunked: `chunked_divergence(hidden, W, teacher_hidden=..., teacher_lm_head_weight=W_t)`: the
  teacher's logits are computed per chunk too, from its hidden states and LM head;
- chunked-sparse: `chunked_divergence` on cached top-k targets (topk_ids/logprobs + tail),
  computed before the measurement (they are what the teacher cache holds).

Each variant runs in a fresh subprocess with the same seeded inputs. Its number is the peak
RSS (ru_maxrss, reset through /proc/self/clear_refs once the inputs exist and a warm-up has
run) minus the RSS at that moment: the memory the loss and its backward add on top of the
model's own tensors (the LM head's gradient, V x H = 108 MiB here, is included). The children
run with MALLOC_MMAP_THRESHOLD_=65536 (see main). Prints one JSON object and Markdown rows.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import platform
import resource
import subprocess
import sys
import time

VARIANTS = ("naive", "chunked", "chunked-sparse")


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def reset_peak_rss() -> None:
    """Set this process's peak RSS (VmHWM, which ru_maxrss reports) to its current RSS.

    Without it the peak of building the inputs (a temporary or two of V x H) would count
    as the loss's own.
    """
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def child(args) -> dict:
    """One variant, in this (fresh) process."""
    import torch

    from distil.training.losses import chunked_divergence, forward_kl

    torch.manual_seed(0)
    n, v, h = args.tokens, args.vocab, args.hidden
    hidden = torch.randn(n, h, requires_grad=True)
    weight = torch.randn(v, h).mul_(h ** -0.5).requires_grad_()
    t_hidden, t_weight = torch.randn(n, h), torch.randn(v, h).mul_(h ** -0.5)
    topk = None
    if args.variant == "chunked-sparse":
        topk = sparse_targets(t_hidden, t_weight, args.top_k)

    def run() -> torch.Tensor:
        if args.variant == "naive":
            with torch.no_grad():
                teacher_logits = t_hidden @ t_weight.T
            loss = forward_kl(hidden @ weight.T, teacher_logits)
        elif args.variant == "chunked":
            loss = chunked_divergence(hidden, weight, teacher_hidden=t_hidden, teacher_lm_head_weight=t_weight,
                                      chunk_tokens=int(args.chunk_tokens))
        else:
            loss = chunked_divergence(hidden, weight, topk_ids=topk[0], topk_logprobs=topk[1], tail_logprob=topk[2],
                                      chunk_tokens=int(args.chunk_tokens))
        loss.backward()
        return loss

    # Warm-up, forward and backward, on a sliver of the work: the first backward starts the
    # autograd engine and BLAS buffers (~80 MiB here), a process cost, not the loss's memory.
    forward_kl(hidden[:4] @ weight.T, t_hidden[:4] @ t_weight.T).backward()
    hidden.grad = weight.grad = None
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    reset_peak_rss()
    before = rss_bytes()
    t0 = time.perf_counter()
    loss = run()
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    return {"variant": args.variant, "peak_growth_mib": round((peak - before) / 2**20, 1),
            "rss_before_mib": round(before / 2**20, 1), "seconds": round(seconds, 3), "loss": loss.item(),
            "grad_norm_weight": weight.grad.norm().item()}


def sparse_targets(t_hidden, t_weight, k: int, rows: int = 64):
    """The teacher's top-k log-probs and tail, a few rows at a time (as the teacher cache would hold them)."""
    import torch

    ids, top, tail = [], [], []
    with torch.no_grad():
        for s in range(0, t_hidden.shape[0], rows):
            logp = torch.log_softmax(t_hidden[s:s + rows] @ t_weight.T, -1)
            best = logp.topk(k, dim=-1)
            ids.append(best.indices)
            top.append(best.values)
            tail.append(torch.logsumexp(logp.scatter(-1, best.indices, float("-inf")), -1))
    return torch.cat(ids), torch.cat(top), torch.cat(tail)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--vocab", type=int, default=49152)
    parser.add_argument("--hidden", type=int, default=576)
    parser.add_argument("--chunk-tokens", default="64,128,256", help="comma-separated chunk sizes to measure")
    parser.add_argument("--top-k", type=int, default=32, help="targets per token for chunked-sparse")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--variant", help=argparse.SUPPRESS)  # set in the subprocess
    args = parser.parse_args()
    if args.variant:
        print(json.dumps(child(args)))
        return

    # glibc's dynamic mmap threshold keeps freed tensors of up to 32 MiB in the heap, where
    # fragmentation, not the loss, then decides RSS. A fixed small threshold gives every tensor
    # its own mapping, returned on free, so RSS follows the live tensors. Same for all variants.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": os.environ.get("MALLOC_MMAP_THRESHOLD_", "65536")}
    runs = [(v, None) for v in args.variants.split(",") if v == "naive"]
    runs += [(v, c) for c in args.chunk_tokens.split(",") for v in args.variants.split(",") if v != "naive"]
    results = {}
    for variant, chunk in runs:
        cmd = [sys.executable, __file__, "--variant", variant, "--tokens", str(args.tokens), "--vocab",
               str(args.vocab), "--hidden", str(args.hidden), "--chunk-tokens", str(chunk or 0),
               "--top-k", str(args.top_k)]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout
        results[variant if chunk is None else f"{variant} (chunk {chunk})"] = json.loads(out.strip().splitlines()[-1])
    import torch

    summary = {"tokens": args.tokens, "vocab": args.vocab, "hidden": args.hidden, "top_k": args.top_k,
               "dtype": "float32", "device": "cpu", "torch": torch.__version__, "threads": torch.get_num_threads(),
               "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
               "MALLOC_MMAP_THRESHOLD_": env["MALLOC_MMAP_THRESHOLD_"], "results": results}
    if "naive" in results:
        base = results["naive"]["peak_growth_mib"]
        for r in results.values():
            r["fraction_of_naive"] = round(r["peak_growth_mib"] / base, 3)
    print(json.dumps(summary, indent=2))
    print()
    print("| variant | tokens x vocab | peak memory growth (MiB) | fraction of naive | seconds (fwd+bwd) | loss |")
    print("|---|---|---|---|---|---|")
    for label, r in results.items():
        print(f"| {label} | {args.tokens} x {args.vocab} | {r['peak_growth_mib']:.0f} | "
              f"{r.get('fraction_of_naive', float('nan')):.3f} | {r['seconds']:.2f} | {r['loss']:.6f} |")


if __name__ == "__main__":
    main()
