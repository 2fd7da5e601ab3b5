"""The training loop: a student learns the teacher's cached soft targets.

One plain loop (nanoGPT-style), `Loop`, run through Hugging Face Accelerate, so `accelerate
launch` gives data parallelism unchanged and one CPU gives a plain loop. It trains every
student: causal LMs here (`train_student`), classifiers and sentence encoders in `distil.tasks`.
Losses are summed per token (or example) and divided by the count in the whole global batch
(all micro-batches, all processes), so gradient accumulation and data parallelism do not change
the loss.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import random
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from safetensors.torch import load_model, save_model
from torch import nn

from distil.config.recipe import TrainConfig
from distil.data.batches import Batch, collate
from distil.errors import DistilError, is_disk_full
from distil.files import write_atomic
from distil.training.memory import keep_freed_memory
from distil.training.objective import DistillationObjective
from distil.training.online import rollout, teacher_forward
from distil.training import sharding


TRACKER_PACKAGES = {"tensorboard": "tensorboard", "comet_ml": "comet-ml"}  # pip names, where not the tracker's


def lr_lambda(step: int, *, warmup: int, total: int, schedule: str, min_ratio: float) -> float:
    """Multiplier of the peak learning rate at `step`: linear warmup, then the schedule."""
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    shape = 0.5 * (1 + math.cos(math.pi * progress)) if schedule == "cosine" else 1 - progress
    return min_ratio + (1 - min_ratio) * shape


def check_trackers(report_to: tuple[str, ...]) -> None:
    """Every tracker of train.report_to has its package installed (Accelerate would leave it out silently)."""
    from accelerate.tracking import get_available_trackers

    available = {str(t) for t in get_available_trackers()}
    missing = [name for name in report_to if name not in available]
    if missing:
        raise DistilError(f"{', '.join(missing)} {'is' if len(missing) == 1 else 'are'} not installed "
                          f"(pip install {' '.join(TRACKER_PACKAGES.get(m, m) for m in missing)})",
                          field="train.report_to")


def micro_batch_order(n_rows: int, micro_batch: int, seed: int, start: int, count: int,
                      drop_last: bool = True) -> list[list[int]]:
    """Row indices of micro-batches start..start+count, drawn epoch by epoch from a seeded shuffle.

    A pure function of (seed, position), so a resumed run sees exactly the batches an
    uninterrupted one would. Each epoch's last, partial micro-batch is dropped, or with
    `drop_last=False` kept (a smaller micro-batch; the loop's count-normalisation weighs it right).
    """
    per_epoch = max(1, n_rows // micro_batch) if drop_last else math.ceil(n_rows / micro_batch)
    batches, cache = [], {}
    for i in range(start, start + count):
        epoch, j = divmod(i, per_epoch)
        if epoch not in cache:
            cache[epoch] = torch.randperm(n_rows, generator=torch.Generator().manual_seed(seed * 100_003 + epoch)).tolist()
        batches.append(cache[epoch][j * micro_batch:(j + 1) * micro_batch])
    return batches


def save_checkpoint(folder: Path, step: int, write_model, state: dict, keep: int = 2) -> None:
    """Write `folder/step-NNNNNNN` atomically: `write_model(tmp)` saves the weights, `state` (optimizer,
    scheduler, RNG, step...) goes to train_state.pt; only the newest `keep` checkpoints stay.

    A failed write (disk full) leaves the earlier checkpoints intact and raises a DistilError.
    """
    final = folder / f"step-{step:07d}"

    def write(tmp: Path) -> None:
        write_model(tmp)
        torch.save({"step": step, **state}, tmp / "train_state.pt")

    try:
        write_atomic(final, write)
    except Exception as e:  # safetensors and torch.save report write failures as their own error types
        reason = "disk full" if is_disk_full(e, folder) else str(e).splitlines()[0]
        raise DistilError(f"cannot write checkpoint ({reason}); earlier checkpoints are intact, "
                          "resume with --resume", file=str(final)) from e
    for old in sorted(folder.glob("step-*"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def _save_checkpoint(folder: Path, step: int, objective: nn.Module, optimizer, scheduler, keep: int = 2) -> None:
    def write_model(tmp: Path) -> None:
        tmp.mkdir(parents=True)
        save_model(objective, str(tmp / "model.safetensors"))  # handles shared (tied) tensors

    save_checkpoint(folder, step, write_model,
                    {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                     "torch_rng": torch.get_rng_state(), "python_rng": random.getstate()}, keep)


def latest_checkpoint(folder: Path) -> Path | None:
    done = [p for p in sorted(folder.glob("step-*")) if (p / "train_state.pt").exists()]
    return done[-1] if done else None


def _micro_seed(seed: int, step: int, micro: int) -> int:
    """A seed for one micro-batch's random choices, independent of process count and resumes."""
    return (seed * 1_000_003 + step) * 1_009 + micro


@dataclass(frozen=True)
class LoopSettings:
    """What the loop takes from a recipe's train section."""
    steps: int
    batch_size: int  # rows per micro-batch; a step has grad_accum * processes micro-batches
    grad_accum: int
    lr: float
    weight_decay: float
    warmup: int
    max_grad_norm: float | None
    seed: int
    log_every: int
    checkpoint_every: int  # 0: never
    adam_betas: tuple[float, float]
    schedule: str = "cosine"
    min_lr_ratio: float = 0.0
    drop_last: bool = True  # see micro_batch_order


# A micro-batch: (step, micro index in the step, row indices) -> (batch, count to normalise by).
MicroBatch = Callable[[int, int, list[int]], tuple[Any, int]]


class Loop:
    """The one training loop of every student (causal LM, classification, embedding).

    Creating it makes the Accelerator and seeds torch and python, so whatever draws random
    numbers (hidden-state projections, a fresh classifier) is built after it and ends the
    same in every run; `run` then trains.

    The objective is a module: `objective(batch)` returns a sequence of parts whose first is the
    batch's loss SUM (over tokens or examples); the loop divides it by the count of the whole
    global batch (all micro-batches, all processes), so accumulation and data parallelism do
    not change the loss.
    """

    def __init__(self, seed: int, report_to: tuple[str, ...] = (), logging_dir: Path | None = None,
                 mixed_precision: str = "no"):
        """`report_to`: Accelerate's experiment trackers (tensorboard, wandb, mlflow, ...) that get each logged
        metrics line besides the JSONL log; those that write files write them under `logging_dir`.
        `mixed_precision` ("no" or "bf16", the recipe's train.mixed_precision) is Accelerate's: the prepared
        objective's forward runs under bf16 autocast, parameters and optimizer state stay float32. It is
        the recipe's value, whatever an `accelerate launch` config says."""
        check_trackers(report_to)
        keep_freed_memory()
        # Accelerate keeps one mixed-precision setting per process; a process that trains several recipes
        # (a notebook, the tests) drops it when it changes. The process group (PartialState) stays.
        if AcceleratorState._shared_state.get("_mixed_precision", mixed_precision) != mixed_precision:
            AcceleratorState._reset_state()
        # On a machine without an accelerator, `cpu=True` lets Accelerate pick up a torchrun /
        # `accelerate launch` environment as multi-process CPU training (gloo).
        self.accelerator = Accelerator(cpu=cpu_only(),
                                       mixed_precision=mixed_precision, log_with=list(report_to) or None,
                                       project_dir=str(logging_dir) if report_to and logging_dir else None)
        sharding.check_engine(self.accelerator)
        torch.manual_seed(seed)
        random.seed(seed)

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    @property
    def world(self) -> int:
        return self.accelerator.num_processes

    def run(self, objective: nn.Module, micro_batch: MicroBatch, n_rows: int, s: LoopSettings, *, out_dir: Path,
            run_name: str, names: tuple[str, ...] = ("loss",), unit: str = "examples", resume: bool = False,
            fingerprint: str = "", progress=None, step_log: Callable[[list], dict] | None = None) -> dict:
        """Train `objective` for `s.steps` optimizer steps over `n_rows` rows.

        Args:
            objective: see the class docstring; its trainable parameters are optimised in place.
            micro_batch: builds one micro-batch (its rows come from `micro_batch_order`).
            out_dir: writes checkpoints/<run_name>/ and logs/<run_name>.jsonl.
            names: the logged names of the objective's first parts (each summed, then divided
                by the global count).
            unit: what the count counts ("tokens", "examples"); a key of the log and the summary.
            resume: continue from the latest checkpoint of this run, if it was written for the
                same `fingerprint`; otherwise checkpoints of an earlier, different run are removed.
            progress: a `distil.progress.progress_bar()` to report to, or None.
            step_log: extra metrics of a step from its micro-batches' batches.

        Returns:
            A summary: steps, resumed_from, the final logged metrics, `unit` seen, seconds. The prepared
            (wrapped, possibly sharded) objective stays at `self.prepared`.
        """
        accelerator = self.accelerator
        params = [p for p in objective.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=s.lr, weight_decay=s.weight_decay, betas=tuple(s.adam_betas))
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_lambda(
            step, warmup=s.warmup, total=s.steps, schedule=s.schedule, min_ratio=s.min_lr_ratio))
        ckpt_dir = out_dir / "checkpoints" / run_name
        log_path = out_dir / "logs" / f"{run_name}.jsonl"
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        log_path.parent.mkdir(parents=True, exist_ok=True)

        start_step = 0
        stamp = ckpt_dir / "fingerprint.txt"
        same_run = stamp.exists() and stamp.read_text() == fingerprint
        # Processes share the folder: all read the stamp, then the main one alone clears and
        # re-stamps it, then all read the checkpoint.
        accelerator.wait_for_everyone()
        if accelerator.is_main_process and not (resume and same_run):
            shutil.rmtree(ckpt_dir)
            ckpt_dir.mkdir(parents=True)
            stamp.write_text(fingerprint)
        accelerator.wait_for_everyone()
        found = latest_checkpoint(ckpt_dir) if resume and same_run else None
        sharded = sharding.is_sharded(accelerator)
        if found is not None and not sharded:
            load_model(objective, str(found / "model.safetensors"))
            state = torch.load(found / "train_state.pt", weights_only=True)
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            torch.set_rng_state(state["torch_rng"])
            random.setstate(state["python_rng"])
            start_step = state["step"]
            if accelerator.is_main_process:
                truncate_log(log_path, start_step)
        elif found is None and log_path.exists() and accelerator.is_main_process:
            log_path.unlink()

        sharding.configure_deepspeed(accelerator, batch_size=s.batch_size, grad_accum=s.grad_accum,
                                     max_grad_norm=s.max_grad_norm)
        objective, optimizer = accelerator.prepare(objective, optimizer)
        params = [p for p in objective.parameters() if p.requires_grad]  # FSDP2 replaced them with sharded ones
        if found is not None and sharded:  # shards load into the prepared (sharded) model and optimizer
            state = sharding.load_sharded_checkpoint(accelerator, found)
            scheduler.load_state_dict(state["scheduler"])
            start_step = state["step"]
            if accelerator.is_main_process:
                truncate_log(log_path, start_step)
        objective.train()
        tracking = bool(accelerator.log_with)
        if tracking:
            accelerator.init_trackers(run_name, config={k: v if isinstance(v, (int, float, str, bool)) else str(v)
                                                        for k, v in dataclasses.asdict(s).items()})
        world, rank = accelerator.num_processes, accelerator.process_index
        micro_per_step = s.grad_accum * world
        task = progress.add_task(f"train {run_name}", total=s.steps, completed=start_step, status="") if progress else None
        t0, seen, last = time.time(), 0, {}
        for step in range(start_step, s.steps):
            order = micro_batch_order(n_rows, s.batch_size, s.seed, step * micro_per_step, micro_per_step,
                                      drop_last=s.drop_last)
            batches = [micro_batch(step, i, order[i]) for i in range(rank, micro_per_step, world)]
            local_count = torch.tensor(float(sum(count for _, count in batches)), device=accelerator.device)
            global_count = accelerator.reduce(local_count, reduction="sum").item()
            sums = 0
            scale = world / global_count * sharding.backward_scale(accelerator, len(batches))
            for i, (batch, _) in enumerate(batches):
                sync = i == len(batches) - 1
                sharding.set_boundary(accelerator, sync)
                with contextlib.nullcontext() if sync else accelerator.no_sync(objective):
                    parts = objective(batch)
                    # DDP averages gradients over processes: scale so the result is sum / global count.
                    accelerator.backward(parts[0] * scale)
                sums = sums + torch.stack([p.detach() for p in parts]).cpu()
            if s.max_grad_norm:
                accelerator.clip_grad_norm_(params, s.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            sums = accelerator.reduce(sums.to(accelerator.device), reduction="sum").cpu() / global_count
            seen += int(global_count)
            last = {"step": step + 1, **dict(zip(names, sums.tolist())),
                    **(step_log([b for b, _ in batches]) if step_log else {}),
                    "lr": scheduler.get_last_lr()[0], unit: int(global_count), "elapsed_s": round(time.time() - t0, 3)}
            if accelerator.is_main_process:
                if (step + 1) % s.log_every == 0 or step + 1 == s.steps:
                    with open(log_path, "a") as f:
                        f.write(json.dumps(last) + "\n")
                    if tracking:  # the same line, under the same names, to the recipe's train.report_to
                        accelerator.log({k: v for k, v in last.items() if k != "step"}, step=step + 1)
            if s.checkpoint_every and (step + 1) % s.checkpoint_every == 0 and step + 1 < s.steps:
                if sharded:
                    sharding.save_sharded_checkpoint(accelerator, ckpt_dir, step + 1,
                                                     {"scheduler": scheduler.state_dict()})
                elif accelerator.is_main_process:
                    _save_checkpoint(ckpt_dir, step + 1, accelerator.unwrap_model(objective), optimizer, scheduler)
            if progress:
                rate = (step + 1 - start_step) / (time.time() - t0)
                progress.update(task, advance=1, status=f"{rate:.2f} step/s  loss {last['loss']:.3f}")
        accelerator.wait_for_everyone()
        self.prepared = objective
        if tracking:
            accelerator.end_training()  # flushes and closes the trackers' files and runs
        return {"steps": s.steps, "resumed_from": start_step, "final": last, unit: seen,
                "seconds": round(time.time() - t0, 2)}


def cpu_only() -> bool:
    """True on a machine without an accelerator (CUDA or MPS): training runs on the CPU."""
    return not (torch.cuda.is_available() or torch.backends.mps.is_available())


def prepare_student(student: nn.Module, cfg: TrainConfig) -> None:
    """What the recipe's train section changes in the student before training: gradient checkpointing and
    frozen embeddings (`distil plan` measures memory on the student prepared the same way)."""
    if cfg.gradient_checkpointing:
        student.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    if cfg.freeze_embeddings:
        student.get_input_embeddings().weight.requires_grad_(False)
        student.get_output_embeddings().weight.requires_grad_(False)


def train_student(student, rows: list[dict], cfg: TrainConfig, *, pad_id: int, out_dir: Path, run_name: str,
                  alpha: float | None = None, resume: bool = False, fingerprint: str = "", progress=None,
                  teacher=None, stop_ids: set[int] = frozenset(), max_new_tokens: int = 64) -> dict:
    """Train the causal LM `student` in place on cache rows; checkpoints and metrics go under `out_dir`.

    Args:
        student: a causal LM (its weights are updated).
        rows: teacher-cache rows (dicts with prompt_ids, token_ids, topk_* and tail_logprob).
        cfg: the recipe's `train` section (its `mode` picks supervised / sequence / on_policy).
        pad_id: padding token id.
        out_dir, run_name, resume, fingerprint, progress: as `Loop.run`; run_name is "student" or "baseline".
        alpha: overrides cfg.alpha (the cross-entropy-only baseline uses 1.0).
        teacher: a local teacher model; needed by `mode: on_policy` and `cfg.hidden`.
        stop_ids, max_new_tokens: how on-policy rollouts end.

    Returns:
        A summary: steps, final loss, tokens seen, seconds.
    """
    if not rows:
        raise DistilError("no teacher-cache rows to train on", field="data.train")
    on_policy = cfg.mode == "on_policy"
    alpha = 1.0 if cfg.mode == "sequence" else cfg.alpha if alpha is None else alpha
    hidden = cfg.hidden
    if (on_policy or hidden) and teacher is None:
        raise DistilError("needs a local teacher model during training", field="train.hidden" if hidden else "train.mode")
    loop = Loop(cfg.seed, tuple(cfg.report_to), out_dir / "logs", mixed_precision=cfg.mixed_precision)
    prepare_student(student, cfg)
    if hidden:
        _check_hidden_layers(hidden.layers, student, teacher)
    if teacher is not None:
        teacher.to(loop.device).eval().requires_grad_(False)
    loss_params = {"jsd": {"beta": cfg.beta}, "skew_kl": {"skew": cfg.skew},
                   "skew_reverse_kl": {"skew": cfg.skew}}
    objective = DistillationObjective(
        student, alpha=alpha, temperature=cfg.temperature, loss=cfg.loss, loss_params=loss_params,
        hidden_pairs=hidden.layers if hidden else (), hidden_loss=hidden.loss if hidden else "mse",
        hidden_weight=hidden.weight if hidden else 1.0, teacher_width=teacher.config.hidden_size if hidden else None,
        cross_tokenizer=cfg.cross_tokenizer, uld_weight=cfg.uld_weight)
    top_k = len(rows[0]["topk_ids"][0]) if rows[0]["topk_ids"] else 1

    def micro_batch(step: int, micro: int, idx: list[int]) -> tuple[Batch, int]:
        """One micro-batch and its target-token count: cached rows, or (on policy, with probability
        lambda) the student's rollouts."""
        part = [rows[i] for i in idx]
        seed = _micro_seed(cfg.seed, step, micro)
        written = on_policy and torch.rand((), generator=torch.Generator().manual_seed(seed)).item() < cfg.lambda_
        if written:  # sampling runs where the student is, so its generator lives there too
            sampler = torch.Generator(device=loop.device).manual_seed(seed)
            part = rollout(student, part, pad_id=pad_id, stop_ids=stop_ids, max_new_tokens=max_new_tokens,
                           generator=sampler)
        batch = collate(part, pad_id).to(loop.device)
        if written or hidden:
            teacher_forward(teacher, batch, top_k=top_k if written else None,
                            hidden_layers=tuple(t for _, t in hidden.layers) if hidden else ())
        batch.on_policy = written
        return batch, batch.targets.numel()

    settings = LoopSettings(steps=cfg.steps, batch_size=cfg.batch_size, grad_accum=cfg.grad_accum, lr=cfg.lr,
                            weight_decay=cfg.weight_decay, warmup=cfg.warmup, max_grad_norm=cfg.max_grad_norm,
                            seed=cfg.seed, log_every=cfg.log_every, checkpoint_every=cfg.checkpoint_every,
                            adam_betas=tuple(cfg.adam_betas), schedule=cfg.schedule, min_lr_ratio=cfg.min_lr_ratio)
    share = (lambda batches: {"on_policy_share": sum(b.on_policy for b in batches) / len(batches)}) if on_policy else None
    summary = loop.run(objective, micro_batch, len(rows), settings, out_dir=out_dir, run_name=run_name,
                       names=("loss", "ce", "kd") + (("hidden",) if hidden else ()), unit="tokens", resume=resume,
                       fingerprint=fingerprint, progress=progress, step_log=share)
    if sharding.is_sharded(loop.accelerator):
        sharding.gather_student(loop.accelerator, loop.prepared, student)
    if cfg.gradient_checkpointing:
        student.activation_checkpointing_disable()
    return summary


def _check_hidden_layers(pairs, student, teacher) -> None:
    """Each pair names hidden_states both models have (0 = embeddings .. num_hidden_layers)."""
    for i, (s, t) in enumerate(pairs):
        for name, index, model in (("student", s, student), ("teacher", t, teacher)):
            if not 0 <= index <= model.config.num_hidden_layers:
                raise DistilError(f"{name} hidden_states index {index} is out of range 0..{model.config.num_hidden_layers}",
                                  field=f"train.hidden.layers.{i}")


def truncate_log(path: Path, step: int) -> None:
    """Drop metrics past `step`, so a resumed run's log has each step once."""
    if not path.exists():
        return
    kept = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
    path.write_text("".join(line + "\n" for line in kept))
