"""Where distil keeps things on disk, and where its shipped recipes and data live."""

from __future__ import annotations

import os
from pathlib import Path


def distil_home() -> Path:
    """Root of distil's own caches (models, wheels, teacher cache): $DISTIL_HOME or ~/.cache/distil."""
    return Path(os.environ.get("DISTIL_HOME") or Path.home() / ".cache" / "distil")


def shipped(relative: str) -> Path:
    """A file shipped with distil (e.g. "recipes/quickstart.yaml").

    An installed wheel carries them under distil/_shipped; a source checkout has them at
    the repository root.
    """
    here = Path(__file__).resolve().parent
    for root in (here / "_shipped", here.parent.parent):
        if (root / relative).exists():
            return root / relative
    raise FileNotFoundError(relative)
