"""What sharded training (FSDP2 or DeepSpeed ZeRO, from an `accelerate launch` config) needs beyond DDP.

Accelerate does the sharding; this module does the three things the loop must do differently:
refuse a sharding config that Accelerate silently dropped, write checkpoints that every process
takes part in (Accelerate's `save_state`: FSDP's SHARDED_STATE_DICT, DeepSpeed's partitioned
files), and gather the final weights back into the plain student that `save_pretrained` writes.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType

from distil.errors import DistilError
from distil.files import fsync_dir

SHARDED = (DistributedType.FSDP, DistributedType.DEEPSPEED)
TRAIN_STATE = "train_state.pt"


def is_sharded(accelerator: Accelerator) -> bool:
    return accelerator.distributed_type in SHARDED


def check_engine(accelerator: Accelerator) -> None:
    """The engine an `accelerate launch` config asked for is the one running.

    Accelerate (1.15) turns FSDP and DeepSpeed on only for accelerator devices: on a CPU-only
    machine the state stays MULTI_CPU and the config's FSDP / DeepSpeed section is ignored, so the
    run would quietly be plain data parallelism with every weight on every process.
    """
    for env, engine, kind in (("ACCELERATE_USE_FSDP", "FSDP", DistributedType.FSDP),
                              ("ACCELERATE_USE_DEEPSPEED", "DeepSpeed", DistributedType.DEEPSPEED)):
        if os.environ.get(env, "false").lower() == "true" and accelerator.distributed_type != kind:
            raise DistilError(f"the accelerate config asks for {engine}, but Accelerate runs it only on GPUs (or "
                              f"other accelerators); here it would train as {accelerator.distributed_type.value} "
                              "with a full copy of the model per process. Use configs/accelerate/ddp.yaml on "
                              "this machine", field="--config_file")


def configure_deepspeed(accelerator: Accelerator, *, batch_size: int, grad_accum: int,
                        max_grad_norm: float | None) -> None:
    """Fill the DeepSpeed config from the recipe before `prepare`: micro-batch size, accumulation, clipping.

    The loop has no DataLoader for Accelerate to read them from; DeepSpeed clips inside its step.
    """
    if accelerator.distributed_type != DistributedType.DEEPSPEED:
        return
    config = accelerator.state.deepspeed_plugin.deepspeed_config
    config["train_micro_batch_size_per_gpu"] = batch_size
    config["gradient_accumulation_steps"] = grad_accum
    config["train_batch_size"] = batch_size * grad_accum * accelerator.num_processes
    config["gradient_clipping"] = max_grad_norm or 0.0


def backward_scale(accelerator: Accelerator, grad_accum: int) -> float:
    """DeepSpeed divides the loss by its gradient_accumulation_steps in backward; the loop's loss is already
    normalised by the global token count, so this undoes DeepSpeed's division."""
    return float(grad_accum) if accelerator.distributed_type == DistributedType.DEEPSPEED else 1.0


def set_boundary(accelerator: Accelerator, last_micro_batch: bool) -> None:
    """Tell Accelerate (hence DeepSpeed, which steps inside backward) whether this micro-batch ends the step."""
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        accelerator.gradient_state._set_sync_gradients(last_micro_batch)


def save_sharded_checkpoint(accelerator: Accelerator, folder: Path, step: int, state: dict, keep: int = 2) -> None:
    """Every process writes its shards of model and optimizer (and its RNG state) to `folder/step-NNNNNNN`;
    the main process adds train_state.pt (`step` and `state`: scheduler...) and renames the folder into place
    last, so a kill at any moment leaves only complete checkpoints. Collective: all processes call it."""
    final, tmp = folder / f"step-{step:07d}", folder / f".tmp-step-{step:07d}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        torch.save({"step": step, **state}, tmp / TRAIN_STATE)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        fsync_dir(folder)
        for old in sorted(folder.glob("step-*"))[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()


def load_sharded_checkpoint(accelerator: Accelerator, found: Path) -> dict:
    """Load each process's shards and RNG state from `found` into the prepared model and optimizer;
    returns train_state.pt."""
    accelerator.load_state(str(found))
    return torch.load(found / TRAIN_STATE, weights_only=True)


def gather_student(accelerator: Accelerator, objective, student: torch.nn.Module) -> None:
    """Put the full trained weights into `student` as plain tensors on the main process, so it saves as an
    ordinary Hugging Face folder. Collective: all processes call it. (The sharded copy is no longer usable
    for training afterwards.)"""
    state = accelerator.get_state_dict(objective)  # full tensors, on the main process
    if accelerator.is_main_process:
        weights = {k.removeprefix("student."): v for k, v in state.items() if k.startswith("student.")}
        student.load_state_dict(weights, strict=False, assign=True)
        student.tie_weights()
