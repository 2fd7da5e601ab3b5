"""Time a model's generation and peak memory in a fresh process.

Run as `python -m distil.evaluation.speed MODEL_DIR PROMPTS_JSON` (PROMPTS_JSON holds lists of token ids);
prints one JSON object. A fresh process per model keeps one model's memory from hiding
another's: peak memory is the highest resident set seen while loading and generating
(sampled every 5 ms), minus the resident set before loading.
"""

from __future__ import annotations

import json
import resource
import sys
import threading
import time


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


class _PeakRss:
    """Samples the resident set in a background thread; `peak` is the highest value seen."""

    def __init__(self, every_s: float = 0.005):
        self.peak, self._stop = _rss_bytes(), threading.Event()
        self._thread = threading.Thread(target=self._run, args=(every_s,), daemon=True)

    def _run(self, every_s):
        while not self._stop.wait(every_s):
            self.peak = max(self.peak, _rss_bytes())

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss_bytes())


def measure(model_dir: str, prompts: list[list[int]], max_new_tokens: int = 32) -> dict:
    """Greedy-generate `max_new_tokens` for each prompt, one at a time (no early stop).

    Returns speed ({"value": tokens/s, "unit": "tokens/s"}), latency_s (mean seconds per request)
    and peak_memory_bytes (GPU memory allocated on a GPU; resident-set growth on a CPU).
    """
    import torch

    from distil.generation.decoding import generate_batch
    from distil.models.sources import load_causal_lm

    before = _rss_bytes()
    with _PeakRss() as rss:
        model = load_causal_lm(model_dir)
        kwargs = dict(pad_id=0, stop_ids=set(), max_new_tokens=max_new_tokens, top_k=1)
        generate_batch(model, [prompts[0]], **kwargs)  # warm-up: first-call allocations and kernel selection
        times = []
        for ids in prompts:
            t0 = time.perf_counter()
            generate_batch(model, [ids], **kwargs)
            if model.device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
    result = {"speed": {"value": len(prompts) * max_new_tokens / sum(times), "unit": "tokens/s"},
              "latency_s": sum(times) / len(times),
              "device": str(model.device)}
    if model.device.type == "cuda":
        result["peak_memory_bytes"] = torch.cuda.max_memory_allocated()  # GPU memory is what limits there
    else:
        result["peak_memory_bytes"] = rss.peak - before
        result["threads"] = torch.get_num_threads()
    return result


def measure_in_subprocess(model_dir: str, prompts: list[list[int]], max_new_tokens: int = 32) -> dict:
    import subprocess
    import tempfile

    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(prompts, f)
    proc = subprocess.run([sys.executable, "-m", "distil.evaluation.speed", str(model_dir), f.name, str(max_new_tokens)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"speed measurement failed for {model_dir}:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    model_dir, prompts_file, new_tokens = sys.argv[1], sys.argv[2], int(sys.argv[3])
    with open(prompts_file) as f:
        print(json.dumps(measure(model_dir, json.load(f), new_tokens)))
