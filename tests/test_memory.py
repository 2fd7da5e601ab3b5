"""The training process's allocator setting (freed tensors' pages kept) and its resident-set reading."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

FREE_100MB = """
import sys, torch
from distil.training.memory import keep_freed_memory, resident_bytes
kept = keep_freed_memory() if sys.argv[1] == "keep" else False
x = torch.ones(100 * 2 ** 20 // 4)
before = resident_bytes()
del x
print(kept, before - resident_bytes(), resident_bytes(peak=True) >= before)
"""


def freed(mode: str, **env: str) -> tuple[str, int, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("MALLOC_") and k not in ("GLIBC_TUNABLES", "DISTIL_KEEP_FREED_MEMORY")} | env
    out = subprocess.run([sys.executable, "-c", FREE_100MB, mode], capture_output=True, text=True, env=env, check=True)
    kept, returned, peak_seen = out.stdout.split()
    return kept, int(returned), peak_seen


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_freed_tensor_pages_stay_with_the_process_only_when_kept():
    kept, returned, peak_seen = freed("keep")
    assert kept == "True" and returned < 10 * 2 ** 20 and peak_seen == "True"
    # glibc's default: a 100 MB block is its own mmap, unmapped when freed.
    kept, returned, _ = freed("default")
    assert kept == "False" and returned > 90 * 2 ** 20
    # A user who tunes malloc through the environment keeps their setting.
    for env in ({"MALLOC_ARENA_MAX": "2"}, {"DISTIL_KEEP_FREED_MEMORY": "0"}):
        kept, returned, _ = freed("keep", **env)
        assert kept == "False" and returned > 90 * 2 ** 20, env
