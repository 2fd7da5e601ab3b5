"""The training loop: a student learns the teacher's cached soft targets.

One plain loop (nanoGPT-style) run through Hugging Face Accelerate, so `accelerate launch`
gives data parallelism unchanged and one CPU gives a plain loop. Losses are summed per token
and divided by the number of target tokens in the whole global batch (all micro-batches,
all processes), so gradient accumulation and data parallelism do not change the loss.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from distil.errors import DistilError, is_disk_full
from distil.losses import sparse_divergence_from_log_probs, sparse_uld


@dataclass
class Batch:
    input_ids: torch.Tensor       # (B, L) right-padded prompt + teacher text (last token dropped)
    attention_mask: torch.Tensor  # (B, L)
    target_pos: torch.Tensor      # (N,) flat positions in (B*L) that predict a teacher token
    targets: torch.Tensor         # (N,) the teacher's tokens (or, on policy, the student's)
    topk_ids: torch.Tensor        # (N, k)
    topk_logprobs: torch.Tensor   # (N, k)
    tail_logprob: torch.Tensor    # (N,)
    teacher_hidden: tuple[torch.Tensor, ...] = ()  # per matched layer, (N, D_teacher)
    on_policy: bool = False       # the student wrote the text: divergence only, no cross-entropy
    # Cross-tokenizer rows (distil.align): the teacher's own top-k log-probs and tail at the
    # aligned teacher position, and 1 where a student position has one (for ULD).
    uld_logprobs: torch.Tensor | None = None  # (N, k)
    uld_tail: torch.Tensor | None = None      # (N,)
    uld_mask: torch.Tensor | None = None      # (N,)

    def to(self, device) -> "Batch":
        fields = {k: v.to(device) if torch.is_tensor(v) else v for k, v in self.__dict__.items()}
        fields["teacher_hidden"] = tuple(h.to(device) for h in self.teacher_hidden)
        return Batch(**fields)


def collate(rows: list[dict], pad_id: int) -> Batch:
    """Cache rows -> one right-padded batch with the flat positions of the teacher's tokens.

    Rows without soft targets (on-policy rollouts, before the teacher scores them) get
    empty (N, 0) top-k tensors.
    """
    seqs = [(r["prompt_ids"] + r["token_ids"])[:-1] for r in rows]
    width = max(len(s) for s in seqs)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    positions, targets, topk_ids, topk_lp, tail, uld_lp, uld_tail, uld_mask = [], [], [], [], [], [], [], []
    for i, (row, seq) in enumerate(zip(rows, seqs)):
        input_ids[i, : len(seq)] = torch.tensor(seq)
        mask[i, : len(seq)] = 1
        start = len(row["prompt_ids"]) - 1
        positions.extend(i * width + start + j for j in range(len(row["token_ids"])))
        targets.extend(row["token_ids"])
        n = len(row["token_ids"])
        topk_ids.extend(row.get("topk_ids") or [[]] * n)
        topk_lp.extend(row.get("topk_logprobs") or [[]] * n)
        tail.extend(row.get("tail_logprob") or [0.0] * n)
        if "uld_logprobs" in row:
            uld_lp.extend(row["uld_logprobs"])
            uld_tail.extend(row["uld_tail"])
            uld_mask.extend(row["uld_mask"])
    batch = Batch(input_ids, mask, torch.tensor(positions), torch.tensor(targets),
                  torch.tensor(topk_ids, dtype=torch.long).reshape(len(targets), -1),
                  torch.tensor(topk_lp, dtype=torch.float32).reshape(len(targets), -1),
                  torch.tensor(tail, dtype=torch.float32))
    if uld_mask and len(uld_mask) == len(targets):
        batch.uld_logprobs = torch.tensor(uld_lp, dtype=torch.float32)
        batch.uld_tail = torch.tensor(uld_tail, dtype=torch.float32)
        batch.uld_mask = torch.tensor(uld_mask, dtype=torch.float32)
    return batch


class DistillationObjective(nn.Module):
    """Student + loss in one module, so DDP sees a single forward.

    The student's logits are computed only at positions that predict a teacher token, in
    chunks of `chunk_tokens`; when there are several chunks each is recomputed in backward
    (activation checkpointing), so the batch's full logits never exist at once.

    Returns per call the *sums* over target tokens of (loss, cross-entropy, divergence, hidden),
    where loss = alpha * CE + (1 - alpha) * temperature**2 * D(teacher, student) + w * H, D the
    recipe's `train.loss` (forward KL by default, or a weighted sum of divergences) over the cached
    top-k + tail buckets and H the hidden-state loss (`train.hidden`). On-policy batches (the
    student wrote the text) use D alone.
    With `cross_tokenizer` (rows from distil.align), D is: "offsets", the divergence to the
    teacher's top-k mapped to student ids; "uld", `sparse_uld` at aligned positions (its
    temperature**2 factor dropped); "both", their sum with ULD weighted by `uld_weight`.

    With `hidden_pairs`, each pair (student index, teacher index) of hidden_states is compared
    per token after a learned linear projection where the widths differ. The projections belong
    to this module (trained, checkpointed), not to the student, so they are not saved with it.
    """

    def __init__(self, student: nn.Module, *, alpha: float, temperature: float, chunk_tokens: int = 2048,
                 loss: str | dict[str, float] = "forward_kl", loss_params: dict[str, dict] | None = None,
                 hidden_pairs: list[tuple[int, int]] = (), hidden_loss: str = "mse", hidden_weight: float = 1.0,
                 teacher_width: int | None = None, cross_tokenizer: str | None = None, uld_weight: float = 1.0):
        super().__init__()
        self.use_kd = cross_tokenizer in (None, "offsets", "both")
        self.use_uld = cross_tokenizer in ("uld", "both")
        self.uld_weight = uld_weight if cross_tokenizer == "both" else 1.0
        self.student, self.alpha, self.temperature, self.chunk_tokens = student, alpha, temperature, chunk_tokens
        # D = sum of weight * divergence over `loss` (one name: weight 1), each with its `loss_params[name]`.
        terms = {loss: 1.0} if isinstance(loss, str) else dict(loss)
        self.terms = [(name, weight, (loss_params or {}).get(name, {})) for name, weight in terms.items()]
        self.hidden_pairs, self.hidden_loss, self.hidden_weight = list(hidden_pairs), hidden_loss, hidden_weight
        width = student.config.hidden_size
        teacher_width = teacher_width or width
        self.projections = nn.ModuleList(
            nn.Linear(width, teacher_width, bias=False) if width != teacher_width else nn.Identity()
            for _ in self.hidden_pairs)

    def _chunk(self, hidden, targets, topk_ids, topk_logprobs, tail, alpha, uld_lp=None, uld_tail=None, uld_mask=None):
        logits = self.student.get_output_embeddings()(hidden).float()
        # One log_softmax serves cross-entropy and (at T = 1) the divergence: on a
        # (tokens x vocabulary) tensor every extra pass costs as much as the small model's layers.
        log_probs = torch.log_softmax(logits, dim=-1)
        ce = -log_probs.gather(-1, targets.unsqueeze(-1)).sum()
        if alpha == 1.0:
            return ce, ce, torch.zeros_like(ce)
        kd = torch.zeros_like(ce)
        if self.use_uld:
            kd = kd + self.uld_weight * sparse_uld(logits, uld_lp, uld_tail, temperature=self.temperature,
                                                   mask=uld_mask, reduction="sum") / self.temperature ** 2
        if self.use_kd:
            tempered = log_probs if self.temperature == 1.0 else torch.log_softmax(logits / self.temperature, dim=-1)
            for name, weight, params in self.terms:
                kd = kd + weight * sparse_divergence_from_log_probs(
                    name, tempered, topk_ids, topk_logprobs, tail, temperature=self.temperature, reduction="sum",
                    **params)
        return alpha * ce + (1 - alpha) * self.temperature ** 2 * kd, ce, kd

    def _hidden_loss(self, student_states, teacher_states) -> torch.Tensor:
        """Sum over tokens of the per-token hidden-state loss, averaged over the matched pairs."""
        total = 0.0
        for proj, (s, _), target in zip(self.projections, self.hidden_pairs, teacher_states):
            pred = proj(student_states[s])
            if self.hidden_loss == "mse":
                total = total + (pred.float() - target).pow(2).mean(-1).sum()
            else:
                total = total + (1 - torch.cosine_similarity(pred.float(), target, dim=-1)).sum()
        return total / len(self.hidden_pairs)

    def forward(self, batch: Batch):
        out = self.student.base_model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                                      output_hidden_states=bool(self.hidden_pairs))
        hidden = out.last_hidden_state.flatten(0, 1)[batch.target_pos]
        alpha = 0.0 if batch.on_policy else self.alpha
        n = hidden.shape[0]
        parts = []
        for s in range(0, n, self.chunk_tokens):
            args = (hidden[s:s + self.chunk_tokens], batch.targets[s:s + self.chunk_tokens],
                    batch.topk_ids[s:s + self.chunk_tokens], batch.topk_logprobs[s:s + self.chunk_tokens],
                    batch.tail_logprob[s:s + self.chunk_tokens], alpha)
            if self.use_uld:
                args += tuple(t[s:s + self.chunk_tokens] for t in (batch.uld_logprobs, batch.uld_tail, batch.uld_mask))
            parts.append(checkpoint(self._chunk, *args, use_reentrant=False) if n > self.chunk_tokens else self._chunk(*args))
        loss, ce, kd = (torch.stack(p).sum() for p in zip(*parts))
        hid = torch.zeros_like(loss)
        if self.hidden_pairs:
            states = {s: out.hidden_states[s].flatten(0, 1)[batch.target_pos] for s, _ in self.hidden_pairs}
            hid = self._hidden_loss(states, batch.teacher_hidden)
            loss = loss + self.hidden_weight * hid
        return loss, ce, kd, hid


def lr_lambda(step: int, *, warmup: int, total: int, schedule: str, min_ratio: float) -> float:
    """Multiplier of the peak learning rate at `step`: linear warmup, then the schedule."""
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    shape = 0.5 * (1 + math.cos(math.pi * progress)) if schedule == "cosine" else 1 - progress
    return min_ratio + (1 - min_ratio) * shape


def micro_batch_order(n_rows: int, micro_batch: int, seed: int, start: int, count: int) -> list[list[int]]:
    """Row indices of micro-batches start..start+count, drawn epoch by epoch from a seeded shuffle.

    A pure function of (seed, position), so a resumed run sees exactly the batches an
    uninterrupted one would.
    """
    per_epoch = max(1, n_rows // micro_batch)
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
    tmp, final = folder / f".step-{step:07d}.tmp", folder / f"step-{step:07d}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        write_model(tmp)
        torch.save({"step": step, **state}, tmp / "train_state.pt")
    except Exception as e:  # safetensors and torch.save report write failures as their own error types
        shutil.rmtree(tmp, ignore_errors=True)
        reason = "disk full" if is_disk_full(e, folder) else str(e).splitlines()[0]
        raise DistilError(f"cannot write checkpoint ({reason}); earlier checkpoints are intact, "
                          "resume with --resume", file=str(final)) from e
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    for old in sorted(folder.glob("step-*"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def _save_checkpoint(folder: Path, step: int, objective: DistillationObjective, optimizer, scheduler,
                     keep: int = 2) -> None:
    save_checkpoint(folder, step, objective.student.save_pretrained,
                    {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                     "projections": objective.projections.state_dict(),
                     "torch_rng": torch.get_rng_state(), "python_rng": random.getstate()}, keep)


def latest_checkpoint(folder: Path) -> Path | None:
    done = [p for p in sorted(folder.glob("step-*")) if (p / "train_state.pt").exists()]
    return done[-1] if done else None


def _micro_seed(seed: int, step: int, micro: int) -> int:
    """A seed for one micro-batch's random choices, independent of process count and resumes."""
    return (seed * 1_000_003 + step) * 1_009 + micro


def train_student(student, rows: list[dict], cfg, *, pad_id: int, out_dir: Path, run_name: str,
                  alpha: float | None = None, resume: bool = False, fingerprint: str = "", progress=None,
                  teacher=None, stop_ids: set[int] = frozenset(), max_new_tokens: int = 64) -> dict:
    """Train `student` in place on cache rows; checkpoints and metrics go under `out_dir`.

    Args:
        student: a causal LM (its weights are updated).
        rows: teacher-cache rows (dicts with prompt_ids, token_ids, topk_* and tail_logprob).
        cfg: the recipe's `train` section (its `mode` picks supervised / sequence / on_policy).
        pad_id: padding token id.
        out_dir: run folder; writes checkpoints/<run_name>/ and logs/<run_name>.jsonl.
        run_name: "student" or "baseline".
        alpha: overrides cfg.alpha (the cross-entropy-only baseline uses 1.0).
        resume: continue from the latest checkpoint of this run, if it was written for the
            same `fingerprint`; otherwise checkpoints of an earlier, different run are removed.
        fingerprint: identifies the training setup (recipe + data); stored with checkpoints.
        progress: a `distil.progress.progress_bar()` to report to, or None.
        teacher: a local teacher model; needed by `mode: on_policy` and `cfg.hidden`.
        stop_ids, max_new_tokens: how on-policy rollouts end.

    Returns:
        A summary: steps, final loss, tokens seen, seconds.
    """
    from accelerate import Accelerator

    from distil.online import rollout, teacher_forward

    if not rows:
        raise DistilError("no teacher-cache rows to train on", field="data.train")
    on_policy = cfg.mode == "on_policy"
    alpha = 1.0 if cfg.mode == "sequence" else cfg.alpha if alpha is None else alpha
    hidden = cfg.hidden
    if (on_policy or hidden) and teacher is None:
        raise DistilError("needs a local teacher model during training", field="train.hidden" if hidden else "train.mode")
    # On a machine without an accelerator, `cpu=True` lets Accelerate pick up a torchrun /
    # `accelerate launch` environment as multi-process CPU training (gloo).
    accelerator = Accelerator(cpu=not (torch.cuda.is_available() or torch.backends.mps.is_available()))
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    if cfg.freeze_embeddings:
        student.get_input_embeddings().weight.requires_grad_(False)
        student.get_output_embeddings().weight.requires_grad_(False)
    if hidden:
        _check_hidden_layers(hidden.layers, student, teacher)
    if teacher is not None:
        teacher.to(accelerator.device).eval().requires_grad_(False)
    loss_params = {"jsd": {"beta": cfg.beta}, "skew_kl": {"alpha": cfg.skew_alpha},
                   "skew_reverse_kl": {"alpha": cfg.skew_alpha}}
    objective = DistillationObjective(
        student, alpha=alpha, temperature=cfg.temperature, loss=cfg.loss, loss_params=loss_params,
        hidden_pairs=hidden.layers if hidden else (), hidden_loss=hidden.loss if hidden else "mse",
        hidden_weight=hidden.weight if hidden else 1.0, teacher_width=teacher.config.hidden_size if hidden else None,
        cross_tokenizer=getattr(cfg, "cross_tokenizer", None), uld_weight=getattr(cfg, "uld_weight", 1.0))
    params = [p for p in objective.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.95))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_lambda(
        s, warmup=cfg.warmup, total=cfg.steps, schedule=cfg.schedule, min_ratio=cfg.min_lr_ratio))
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
    if found is not None:
        from safetensors.torch import load_model
        load_model(student, found / "model.safetensors", strict=False)
        state = torch.load(found / "train_state.pt", weights_only=True)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        objective.projections.load_state_dict(state["projections"])
        torch.set_rng_state(state["torch_rng"])
        random.setstate(state["python_rng"])
        start_step = state["step"]
        if accelerator.is_main_process:
            truncate_log(log_path, start_step)
    elif log_path.exists() and accelerator.is_main_process:
        log_path.unlink()

    objective, optimizer = accelerator.prepare(objective, optimizer)
    objective.train()
    world, rank = accelerator.num_processes, accelerator.process_index
    micro_per_step = cfg.grad_accum * world
    top_k = len(rows[0]["topk_ids"][0]) if rows[0]["topk_ids"] else 1

    def micro_batch(step: int, micro: int, idx: list[int]) -> Batch:
        """One micro-batch: cached rows, or (on policy, with probability lambda) the student's rollouts."""
        part = [rows[i] for i in idx]
        seed = _micro_seed(cfg.seed, step, micro)
        written = on_policy and torch.rand((), generator=torch.Generator().manual_seed(seed)).item() < cfg.lambda_
        if written:  # sampling runs where the student is, so its generator lives there too
            sampler = torch.Generator(device=accelerator.device).manual_seed(seed)
            part = rollout(accelerator.unwrap_model(objective).student, part, pad_id=pad_id, stop_ids=stop_ids,
                           max_new_tokens=max_new_tokens, generator=sampler)
        batch = collate(part, pad_id).to(accelerator.device)
        if written or hidden:
            teacher_forward(teacher, batch, top_k=top_k if written else None,
                            hidden_layers=tuple(t for _, t in hidden.layers) if hidden else ())
        batch.on_policy = written
        return batch

    task = progress.add_task(f"train {run_name}", total=cfg.steps, completed=start_step, status="") if progress else None
    t0, tokens_seen, last = time.time(), 0, {}
    for step in range(start_step, cfg.steps):
        order = micro_batch_order(len(rows), cfg.batch_size, cfg.seed, step * micro_per_step, micro_per_step)
        batches = [micro_batch(step, i, order[i]) for i in range(rank, micro_per_step, world)]
        local_tokens = torch.tensor(float(sum(b.targets.numel() for b in batches)), device=accelerator.device)
        global_tokens = accelerator.reduce(local_tokens, reduction="sum").item()
        sums = torch.zeros(4)
        for i, batch in enumerate(batches):
            sync = i == len(batches) - 1
            with contextlib.nullcontext() if sync else accelerator.no_sync(objective):
                parts = objective(batch)
                # DDP averages gradients over processes: scale so the result is sum / global tokens.
                accelerator.backward(parts[0] * world / global_tokens)
            sums += torch.stack([p.detach() for p in parts]).cpu()
        if cfg.max_grad_norm:
            accelerator.clip_grad_norm_(params, cfg.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        sums = accelerator.reduce(sums.to(accelerator.device), reduction="sum").cpu() / global_tokens
        tokens_seen += int(global_tokens)
        last = {"step": step + 1, "loss": sums[0].item(), "ce": sums[1].item(), "kd": sums[2].item(),
                **({"hidden": sums[3].item()} if hidden else {}),
                **({"on_policy_share": sum(b.on_policy for b in batches) / len(batches)} if on_policy else {}),
                "lr": scheduler.get_last_lr()[0], "tokens": int(global_tokens), "elapsed_s": round(time.time() - t0, 3)}
        if accelerator.is_main_process:
            if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps:
                with open(log_path, "a") as f:
                    f.write(json.dumps(last) + "\n")
            if (step + 1) % cfg.checkpoint_every == 0 and step + 1 < cfg.steps:
                _save_checkpoint(ckpt_dir, step + 1, accelerator.unwrap_model(objective), optimizer, scheduler)
        if progress:
            rate = (step + 1 - start_step) / (time.time() - t0)
            progress.update(task, advance=1, status=f"{rate:.2f} step/s  loss {last['loss']:.3f}")
    accelerator.wait_for_everyone()
    return {"steps": cfg.steps, "resumed_from": start_step, "final": last, "tokens": tokens_seen,
            "seconds": round(time.time() - t0, 2)}


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
