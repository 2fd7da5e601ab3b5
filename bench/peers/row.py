"""Train one row in this process and write its result.json: steps, loop seconds, process wall time, peak RSS.

    python -m bench.peers.row NAME WORK OUT [recipe overrides for distil-* rows...]

The driver (`bench.peers.run`) starts one such process per row, so each row's peak RSS is its own:
VmHWM of /proc/self/status, the high-water mark of this process's own memory map. (Not `ru_maxrss`:
it survives fork and exec, so every row reported the driver's peak, 3,376 MB, once the driver had
loaded the teacher.)
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

STARTED = time.perf_counter()  # before torch, transformers and TRL are imported: their import time counts


def peak_rss_mb() -> float:
    """This process's peak resident set, MB."""
    from distil.training.memory import resident_bytes

    return round(resident_bytes(peak=True) / 2 ** 20, 1)


def main(argv: list[str]) -> None:
    from bench.peers.trainers import run_row

    name, work, out, extra = argv[0], Path(argv[1]), Path(argv[2]), argv[3:]
    result = run_row(name, work, out, extra)
    result.update(row=name, overrides=extra, wall_s=round(time.perf_counter() - STARTED, 2),
                  peak_rss_mb=peak_rss_mb())
    (out / "result.json").write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main(sys.argv[1:])
