"""Pieces the classification and embedding tasks share: tensor cache files, a small training
loop with warmup + cosine decay and a progress bar, fingerprints and atomic writes."""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import get_cosine_schedule_with_warmup

from distil.progress import progress_bar


def fingerprint(*parts) -> str:
    """sha256 of the JSON of `parts` (sorted keys): the content address of cached work."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def tensor_digest(*tensors: torch.Tensor) -> str:
    h = hashlib.sha256()
    for t in tensors:
        h.update(str((tuple(t.shape), t.dtype)).encode())
        h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def write_atomic(path: Path, write: Callable[[Path], None]) -> None:
    """Call write(tmp) then rename tmp to path, so a kill never leaves a half-written file/folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True) if tmp.is_dir() else tmp.unlink(missing_ok=True)
    write(tmp)
    if tmp.is_file():
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
    if path.is_dir():
        shutil.rmtree(path)
    os.replace(tmp, path)


def save_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    write_atomic(path, lambda tmp: save_file({k: v.contiguous().cpu() for k, v in tensors.items()}, str(tmp)))


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


def write_json(path: Path, data) -> None:
    write_atomic(path, lambda tmp: tmp.write_text(json.dumps(data, indent=2, default=str)))


def batches(n: int, batch_size: int, *, seed: int, epoch: int) -> Iterator[torch.Tensor]:
    """Index batches of one epoch, shuffled by (seed, epoch) alone, so runs are reproducible."""
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    order = torch.randperm(n, generator=g)
    for i in range(0, n, batch_size):
        yield order[i: i + batch_size]


def fit(model: torch.nn.Module, loss_fn: Callable[[torch.Tensor], torch.Tensor], n: int, *, epochs: int,
        batch_size: int, lr: float, weight_decay: float, warmup: int, max_grad_norm: float | None, seed: int,
        name: str, log_path: Path | None = None) -> dict:
    """Train `model` for `epochs` over `n` examples; `loss_fn(index_batch)` returns the batch's loss.

    AdamW, linear warmup then cosine decay to zero; a progress bar; one JSON line per logged
    step in `log_path`. Returns {steps, seconds, final_loss}.
    """
    torch.manual_seed(seed)
    steps = epochs * math.ceil(n / batch_size)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=weight_decay)
    sched = get_cosine_schedule_with_warmup(opt, min(warmup, steps // 2), steps)
    model.train()
    t0, step, ema = time.time(), 0, None
    log = open(log_path, "w") if log_path else None
    try:
        with progress_bar() as bar:
            task = bar.add_task(f"train {name}", total=steps, status="")
            for epoch in range(epochs):
                for idx in batches(n, batch_size, seed=seed, epoch=epoch):
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
                    bar.update(task, advance=1, status=f"loss {ema:.4f}")
    finally:
        if log:
            log.close()
    model.eval()
    return {"steps": steps, "seconds": round(time.time() - t0, 1), "final_loss": round(ema or 0.0, 5)}


def parameter_count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def read_rows(path: Path) -> list[tuple[dict, dict]]:
    """(where, row) pairs of a JSONL / CSV / Parquet table; `where` is {"line": n} or {"row": n}."""
    from distil import data
    from distil.errors import DistilError

    file = str(path)
    data._check_readable(file)
    suffix = path.suffix.lower()
    readers = {".csv": data._read_csv, ".parquet": data._read_parquet}
    reader = data._read_jsonl if suffix in data.JSONL_SUFFIXES else readers.get(suffix)
    if reader is None:
        raise DistilError(f"unsupported file type {suffix!r}: expected .jsonl, .csv or .parquet", file=file)
    rows = list(reader(file))
    if not rows:
        raise DistilError("no rows", file=file)
    return rows
