"""Pieces the classification and embedding tasks share: tensor cache files, a small training
loop with warmup + cosine decay and a progress bar, fingerprints and atomic writes."""

from __future__ import annotations

import json
import math
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import get_cosine_schedule_with_warmup

from distil.files import write_atomic
from distil.progress import progress_bar


def save_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    write_atomic(path, lambda tmp: save_file({k: v.contiguous().cpu() for k, v in tensors.items()}, str(tmp)))


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


def batches(n: int, batch_size: int, *, seed: int, epoch: int) -> Iterator[torch.Tensor]:
    """Index batches of one epoch, shuffled by (seed, epoch) alone, so runs are reproducible."""
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    order = torch.randperm(n, generator=g)
    for i in range(0, n, batch_size):
        yield order[i: i + batch_size]


def fit(model: torch.nn.Module, loss_fn: Callable[[torch.Tensor], torch.Tensor], n: int, *, epochs: int,
        batch_size: int, lr: float, weight_decay: float, warmup: int, max_grad_norm: float | None, seed: int,
        name: str, log_path: Path | None = None, checkpoints: Path | None = None, checkpoint_every: int = 0,
        resume: bool = False, fingerprint: str = "") -> dict:
    """Train `model` for `epochs` over `n` examples; `loss_fn(index_batch)` returns the batch's loss.

    AdamW, linear warmup then cosine decay to zero; a progress bar; one JSON line per logged
    step in `log_path`. With `checkpoints` (a folder) and `checkpoint_every` > 0, the model,
    optimizer, scheduler, RNG state and step are saved every `checkpoint_every` steps
    (`distil.training.loop.save_checkpoint`); `resume` continues from the newest one written for the
    same `fingerprint`, and ends with the weights an uninterrupted run would have.
    Returns {steps, resumed_from, seconds, final_loss}.
    """
    from distil.training.loop import truncate_log

    torch.manual_seed(seed)
    per_epoch = math.ceil(n / batch_size)
    steps = epochs * per_epoch
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=weight_decay)
    sched = get_cosine_schedule_with_warmup(opt, min(warmup, steps // 2), steps)
    start, ema = 0, None
    if checkpoints is not None:
        start, ema = _restore(checkpoints, model, opt, sched, resume=resume, fingerprint=fingerprint)
    if log_path and start:
        truncate_log(log_path, start)
    elif log_path:
        log_path.unlink(missing_ok=True)
    model.train()
    t0 = time.time()
    log = open(log_path, "a") if log_path else None
    try:
        with progress_bar() as bar:
            task = bar.add_task(f"train {name}", total=steps, completed=start, status="")
            for epoch in range(start // per_epoch, epochs):
                for j, idx in enumerate(batches(n, batch_size, seed=seed, epoch=epoch)):
                    step = epoch * per_epoch + j
                    if step < start:
                        continue
                    loss = loss_fn(idx)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    if max_grad_norm:
                        torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
                    opt.step()
                    sched.step()
                    step += 1
                    value = float(loss.detach())
                    ema = value if ema is None else 0.95 * ema + 0.05 * value
                    if log and (step % 20 == 0 or step == steps):
                        log.write(json.dumps({"step": step, "epoch": epoch, "loss": value, "lr": sched.get_last_lr()[0]}) + "\n")
                        log.flush()
                    if checkpoints is not None and checkpoint_every and step % checkpoint_every == 0 and step < steps:
                        _save_checkpoint(checkpoints, step, model, opt, sched, ema)
                    bar.update(task, advance=1, status=f"loss {ema:.4f}")
    finally:
        if log:
            log.close()
    model.eval()
    return {"steps": steps, "resumed_from": start, "seconds": round(time.time() - t0, 1),
            "final_loss": round(ema or 0.0, 5)}


def _save_checkpoint(folder: Path, step: int, model: torch.nn.Module, opt, sched, ema: float) -> None:
    from safetensors.torch import save_model

    from distil.training.loop import save_checkpoint

    def write_model(tmp: Path):
        tmp.mkdir(parents=True)
        save_model(model, str(tmp / "model.safetensors"))  # handles shared (tied) tensors

    save_checkpoint(folder, step, write_model, {"optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                                                "torch_rng": torch.get_rng_state(), "ema": ema})


def _restore(folder: Path, model: torch.nn.Module, opt, sched, *, resume: bool, fingerprint: str) -> tuple[int, float | None]:
    """(step, loss average) of the newest checkpoint in `folder` for this `fingerprint`, loaded into
    model/opt/sched, or (0, None) after clearing the folder when not resuming (or it was another run's)."""
    from safetensors.torch import load_model

    from distil.training.loop import latest_checkpoint

    stamp = folder / "fingerprint.txt"
    same_run = stamp.exists() and stamp.read_text() == fingerprint
    found = latest_checkpoint(folder) if resume and same_run else None
    if found is None:
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        stamp.write_text(fingerprint)
        return 0, None
    load_model(model, str(found / "model.safetensors"))
    state = torch.load(found / "train_state.pt", weights_only=True)
    opt.load_state_dict(state["optimizer"])
    sched.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["torch_rng"])
    return state["step"], state["ema"]


def parameter_count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
