"""Float64 reference helpers shared by the loss tests."""

from __future__ import annotations

import math


def ref_reduce(per, mask, reduction: str):
    """Reference reduction for numpy or torch per-position values: none, sum, or mean over the mask."""
    if mask is not None:
        per = per * mask
    if reduction == "none":
        return per
    if reduction == "sum":
        return per.sum()
    return per.sum() / (mask.sum() if mask is not None else math.prod(per.shape))
