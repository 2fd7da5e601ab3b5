"""Pieces the classification and embedding tasks share: tensor cache files, and training a model
on examples with the shared loop (`distil.training.loop.Loop`)."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from distil.files import write_atomic
from distil.progress import progress_bar
from distil.training.loop import Loop, LoopSettings

LOG_EVERY = 20  # steps between lines of <out>/logs/<run>.jsonl


def save_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    write_atomic(path, lambda tmp: save_file({k: v.contiguous().cpu() for k, v in tensors.items()}, str(tmp)))


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


def to_device(x, device: torch.device):
    """A tensor, or a dict's tensors, on `device`."""
    if isinstance(x, torch.Tensor):
        return x.to(device)
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in x.items()}


class ExampleObjective(nn.Module):
    """A task model for the loop: `forward((idx, seed))` returns (the loss summed over examples idx,).

    `mean_loss(idx, device, seed)` is the task's per-example mean loss on examples idx (their inputs
    moved to `device`, where the model is); times len(idx) it is a sum, which the loop divides
    by the global batch's example count. `seed` is the micro-batch's own (`view_seed`): random
    views drawn from it are the same in a resumed run and on any number of processes.
    """

    def __init__(self, model: nn.Module, mean_loss: Callable[[torch.Tensor, torch.device, int], torch.Tensor]):
        super().__init__()
        self.model, self.mean_loss = model, mean_loss

    def forward(self, batch: tuple[torch.Tensor, int]) -> tuple[torch.Tensor]:
        idx, seed = batch
        device = next(self.model.parameters()).device
        return (self.mean_loss(idx, device, seed) * len(idx),)


def view_seed(seed: int, step: int, micro: int) -> int:
    """The random seed of micro-batch `micro` of optimizer step `step` in a run seeded `seed`."""
    return int(np.random.SeedSequence([seed, step, micro]).generate_state(1)[0])


def train_examples(model: nn.Module, mean_loss: Callable[[torch.Tensor, torch.device, int], torch.Tensor], n: int, cfg, *,
                   out_dir: Path, name: str, checkpoint_every: int = 0, resume: bool = False,
                   fingerprint: str = "") -> dict:
    """Train `model` in place for `cfg.epochs` passes over examples 0..n-1 (see ExampleObjective).

    Each epoch is a shuffle by (seed, epoch) cut into micro-batches of cfg.batch_size (the last
    one smaller); a step takes cfg.grad_accum of them per process, so an epoch is
    ceil(n / batch_size) / (grad_accum * processes) steps. Warmup (at most half the steps) then
    cosine decay to 0. Checkpoints every `checkpoint_every` steps (0: never) under
    `out_dir/checkpoints/<name>/`, metrics in `out_dir/logs/<name>.jsonl`. The model ends on the CPU,
    in eval mode. Returns the loop's summary.
    """
    loop = Loop(cfg.seed)
    micro_batches = cfg.epochs * math.ceil(n / cfg.batch_size)
    steps = math.ceil(micro_batches / (cfg.grad_accum * loop.world))
    settings = LoopSettings(steps=steps, batch_size=cfg.batch_size, grad_accum=cfg.grad_accum, lr=cfg.lr,
                            weight_decay=cfg.weight_decay, warmup=min(cfg.warmup, steps // 2),
                            max_grad_norm=cfg.max_grad_norm, seed=cfg.seed, log_every=LOG_EVERY,
                            checkpoint_every=checkpoint_every, adam_betas=tuple(cfg.adam_betas), drop_last=False)
    with progress_bar() as bar:
        summary = loop.run(ExampleObjective(model, mean_loss),
                           lambda step, micro, idx: ((torch.tensor(idx), view_seed(cfg.seed, step, micro)), len(idx)),
                           n, settings, out_dir=out_dir, run_name=name, resume=resume, fingerprint=fingerprint,
                           progress=bar)
    model.cpu().eval()
    return summary


def parameter_count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
