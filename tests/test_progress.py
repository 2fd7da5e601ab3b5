"""Progress lines in a log (no terminal) give an ETA even when work arrives in a few large chunks."""

from __future__ import annotations

import io
import re
import time

from rich.console import Console

from distil.progress import _Progress


def test_a_log_line_shows_an_eta_from_the_average_rate():
    out = io.StringIO()
    with _Progress(console=Console(file=out, force_terminal=False)) as bar:
        bar.log_every_s = 0.0
        task = bar.add_task("generate", total=100, status="")
        time.sleep(0.2)
        bar.update(task, advance=25)  # one chunk: rich's windowed estimate has a single sample
    line = next(line for line in out.getvalue().splitlines() if "25/100" in line)
    eta = float(re.search(r"ETA (\d+)s", line).group(1))
    assert 0 <= eta <= 2, line  # 0.2 s for 25 of 100: about 0.6 s left
