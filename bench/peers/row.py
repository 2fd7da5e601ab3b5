"""Train one row in this process and write its result.json: steps, loop seconds, process wall time, peak RSS.

    python -m bench.peers.row NAME WORK OUT [recipe overrides for distil-* rows...]

The driver (`bench.peers.run`) starts one such process per row, so each row's peak RSS
(`ru_maxrss` of this process) is its own.
"""

from __future__ import annotations

import json
import resource
import sys
import time
from pathlib import Path

STARTED = time.perf_counter()  # before torch, transformers and TRL are imported: their import time counts


def main(argv: list[str]) -> None:
    from bench.peers.trainers import run_row

    name, work, out, extra = argv[0], Path(argv[1]), Path(argv[2]), argv[3:]
    result = run_row(name, work, out, extra)
    result.update(row=name, overrides=extra, wall_s=round(time.perf_counter() - STARTED, 2),
                  peak_rss_mb=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1))
    (out / "result.json").write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main(sys.argv[1:])
