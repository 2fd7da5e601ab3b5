"""Measured training memory: the bytes a forward pass keeps for its backward (activations), and the
sizes of weights, gradients and optimizer state; `distil plan` and the tests read them."""

from __future__ import annotations

from collections.abc import Callable

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
