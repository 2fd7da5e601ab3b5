"""Training memory: the bytes a forward pass keeps for its backward (activations), the sizes of
weights, gradients and optimizer state, and the process's resident set (`distil plan`, the tests and
the benches read them); and the allocator setting that keeps freed tensors' pages for the next step."""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
import resource
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn


def saved_activation_bytes(fn: Callable[[], torch.Tensor], model: nn.Module) -> tuple[torch.Tensor, int]:
    """Run `fn()` (a forward pass through `model`) and count the bytes it keeps alive for backward.

    Measured, not estimated: the tensors autograd saves (through saved_tensors_hooks), plus, for
    decoder layers under gradient checkpointing, the layer inputs the checkpoint holds to recompute
    from (autograd saves nothing inside such a layer). `model`'s own parameters are not counted;
    bf16 copies autocast makes of them are. Tensors sharing storage count once.

    Returns:
        fn's result and the byte count.

    Example:
        >>> loss, nbytes = saved_activation_bytes(lambda: objective(batch)[0], objective)
    """
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages: dict[int, int] = {}

    def keep(t: torch.Tensor) -> None:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params and t.device.type != "meta":
            storages[storage.data_ptr()] = storage.nbytes()

    def pack(t: torch.Tensor):
        keep(t)
        return t

    def checkpointed_input(module, args, kwargs):
        if module.gradient_checkpointing and module.training:
            hidden = args[0] if args else kwargs.get("hidden_states")
            if isinstance(hidden, torch.Tensor):
                keep(hidden)

    from transformers.modeling_layers import GradientCheckpointingLayer

    hooks = [m.register_forward_pre_hook(checkpointed_input, with_kwargs=True)
             for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = fn()
    finally:
        for h in hooks:
            h.remove()
    return out, sum(storages.values())


def parameter_bytes(model: nn.Module) -> tuple[int, int]:
    """(bytes of all parameters, bytes of the trainable ones), tied parameters counted once."""
    seen, total, trainable = set(), 0, 0
    for p in model.parameters():
        ptr = p.untyped_storage().data_ptr()
        if ptr in seen:
            continue
        seen.add(ptr)
        n = p.numel() * p.element_size()
        total += n
        trainable += n if p.requires_grad else 0
    return total, trainable


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's malloc.h
KEEP_FREED_BYTES = 1 << 30


@functools.cache
def keep_freed_memory() -> bool:
    """Raise glibc's mmap and trim thresholds to 1 GB, once per process; True when they were set.

    glibc serves every block above its mmap threshold (32 MB at most while it adjusts it itself) from
    a fresh mmap and unmaps it when freed, and trims the heap top above 128 KB, so a training step that
    allocates and frees the same large tensors (logits chunks, activations, their gradients) faults
    their pages in again on every step. Kept, the quickstart's CPU steps take 0.75 s instead of
    1.0-1.1 s, for 100-190 MB more peak RSS (bench/keep_freed_memory.py, docs/benchmarks.md).
    Other C libraries have no mallopt; a user who tunes malloc through the environment
    (GLIBC_TUNABLES, MALLOC_*_) keeps that, and DISTIL_KEEP_FREED_MEMORY=0 leaves glibc's default.
    """
    tuned = "glibc.malloc" in os.environ.get("GLIBC_TUNABLES", "") or any(k.startswith("MALLOC_") for k in os.environ)
    if not sys.platform.startswith("linux") or tuned or os.environ.get("DISTIL_KEEP_FREED_MEMORY") == "0":
        return False
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError):  # musl and other C libraries
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, KEEP_FREED_BYTES)) and bool(mallopt(M_TRIM_THRESHOLD, KEEP_FREED_BYTES))


def resident_bytes(peak: bool = False) -> int:
    """This process's resident set now (VmRSS), or its high-water mark (VmHWM), in bytes.

    From /proc/self/status: unlike `ru_maxrss`, VmHWM is this process's own (ru_maxrss survives fork
    and exec, so a child reports its parent's peak). Where /proc is absent, ru_maxrss for both.
    """
    status = Path("/proc/self/status")
    if status.exists():
        key = "VmHWM:" if peak else "VmRSS:"
        return int(next(x for x in status.read_text().splitlines() if x.startswith(key)).split()[1]) * 1024
    scale = 1 if sys.platform == "darwin" else 1024  # bytes on macOS, KiB elsewhere
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale
