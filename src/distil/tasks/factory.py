"""Small torch classifiers a recipe can name as `factory:NAME` with keyword `args`.

A factory model is saved as `model.safetensors` plus `distil_model.json` ({factory, args}),
and `load(folder)` rebuilds it; Hugging Face classifiers use their own save/load instead.
"""

from __future__ import annotations

import json
from pathlib import Path

from safetensors.torch import load_file, save_file
from torch import nn

from distil.errors import DistilError


def cnn(num_classes: int, in_channels: int = 1, channels: tuple[int, ...] = (32, 64), hidden: int = 128,
        image_size: int = 28, dropout: float = 0.0) -> nn.Module:
    """Conv(3x3)-BatchNorm-ReLU-MaxPool(2) per entry of `channels`, then a hidden layer and the classes.

    Example:
        >>> cnn(10, channels=(8, 16), hidden=32)(torch.zeros(2, 1, 28, 28)).shape
        torch.Size([2, 10])
    """
    layers: list[nn.Module] = []
    size, c_in = image_size, in_channels
    for c in channels:
        layers += [nn.Conv2d(c_in, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU(), nn.MaxPool2d(2)]
        size, c_in = size // 2, c
    layers += [nn.Flatten(), nn.Dropout(dropout), nn.Linear(c_in * size * size, hidden), nn.ReLU(),
               nn.Dropout(dropout), nn.Linear(hidden, num_classes)]
    return nn.Sequential(*layers)


def mlp(num_classes: int, in_features: int = 784, hidden: tuple[int, ...] = (64,), dropout: float = 0.0) -> nn.Module:
    """Flatten, then Linear-ReLU per entry of `hidden`, then the classes."""
    layers: list[nn.Module] = [nn.Flatten()]
    for h in hidden:
        layers += [nn.Linear(in_features, h), nn.ReLU(), nn.Dropout(dropout)]
        in_features = h
    layers.append(nn.Linear(in_features, num_classes))
    return nn.Sequential(*layers)


FACTORIES = {"cnn": cnn, "mlp": mlp}


def build(name: str, num_classes: int, args: dict) -> nn.Module:
    """`factory:NAME` (or NAME) with `args` -> a fresh module. Bad names/args raise DistilError."""
    name = name.removeprefix("factory:")
    if name not in FACTORIES:
        raise DistilError(f"unknown factory '{name}'; known: {', '.join(FACTORIES)}", field="model")
    try:
        return FACTORIES[name](num_classes=num_classes, **args)
    except TypeError as e:
        raise DistilError(f"bad arguments for factory '{name}': {e}", field="args") from None


def save(model: nn.Module, folder: Path, name: str, num_classes: int, args: dict) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, folder / "model.safetensors")
    (folder / "distil_model.json").write_text(json.dumps({"factory": name.removeprefix("factory:"),
                                                         "num_classes": num_classes, "args": args}, indent=2))


def load(folder: Path) -> nn.Module:
    """Rebuild a saved factory model (weights through safetensors: no pickle)."""
    meta = json.loads((Path(folder) / "distil_model.json").read_text())
    model = build(meta["factory"], meta["num_classes"], meta["args"])
    model.load_state_dict(load_file(Path(folder) / "model.safetensors"))
    return model.eval()
