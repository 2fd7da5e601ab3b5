"""Two-process data parallelism (gloo on CPU, launched with torchrun) equals one process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file

from distil import pipeline
from distil.data.splits import load_data
from distil.generation.view import TeacherPrompts, cached_rows

# Trains the tiny student for 3 steps and saves its weights (rank 0) and summary.
WORKER = textwrap.dedent("""
    import json, sys
    import torch
    from safetensors.torch import save_file
    from accelerate import PartialState
    from distil.models import sources, students
    from distil.config.recipe import TrainConfig
    from distil.training.loop import train_student

    model_dir, rows_file, out, batch_size, grad_accum = sys.argv[1:6]
    torch.set_num_threads(1)
    # Plain SGD: its update is proportional to the gradient, so a wrongly scaled gradient shows
    # (AdamW's update would hide a constant factor).
    torch.optim.AdamW = lambda params, lr, weight_decay, betas: torch.optim.SGD(params, lr=lr)
    rows = json.load(open(rows_file))
    teacher = sources.load_causal_lm(model_dir, device="cpu")
    torch.manual_seed(0)
    student = students.student_from_teacher(teacher, [0, 3])
    cfg = TrainConfig(steps=3, batch_size=int(batch_size), grad_accum=int(grad_accum), warmup=1, lr=1.0,
                      alpha=0.3, temperature=2.0, max_grad_norm=None)
    summary = train_student(student, rows, cfg, pad_id=0, out_dir=__import__("pathlib").Path(out), run_name="s")
    state = PartialState()
    assert state.num_processes == int(sys.argv[6]), state
    if state.is_main_process:
        save_file({k: v.clone() for k, v in student.state_dict().items() if k != "lm_head.weight"}, out + "/weights.safetensors")
        json.dump(summary, open(out + "/summary.json", "w"))
""")


def _run(cmd: list[str], cwd) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=cwd, timeout=600)
    assert proc.returncode == 0, proc.stderr[-8000:]


@pytest.mark.slow
def test_two_process_ddp_equals_one_process(load, tmp_path, tiny_model_dir):
    recipe = load()
    pipeline.generate(recipe)
    view = TeacherPrompts(recipe)
    train_ex, _ = load_data(recipe)
    rows = cached_rows(recipe, view.keys(train_ex), "train")
    assert view.tokenizer.pad_token_id == 0
    rows_file = tmp_path / "rows.json"
    rows_file.write_text(json.dumps(rows))
    worker = tmp_path / "worker.py"
    worker.write_text(WORKER)

    single, ddp = tmp_path / "single", tmp_path / "ddp"
    single.mkdir(), ddp.mkdir()
    # One process: 2 micro-batches of 4 accumulated. Two processes: one micro-batch of 4 each.
    _run([sys.executable, str(worker), str(tiny_model_dir), str(rows_file), str(single), "4", "2", "1"], tmp_path)
    _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(worker),
          str(tiny_model_dir), str(rows_file), str(ddp), "4", "1", "2"], tmp_path)

    a, b = load_file(str(single / "weights.safetensors")), load_file(str(ddp / "weights.safetensors"))
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(b[name], a[name], atol=1e-5, rtol=1e-4, msg=name)
    sa, sb = (json.loads((d / "summary.json").read_text()) for d in (single, ddp))
    assert sa["tokens"] == sb["tokens"]
    for metric in ("loss", "ce", "kd"):
        assert sb["final"][metric] == pytest.approx(sa["final"][metric], rel=1e-5)
    teacher = load_file(str(tiny_model_dir / "model.safetensors"))
    assert not torch.equal(a["model.layers.1.mlp.up_proj.weight"], teacher["model.layers.3.mlp.up_proj.weight"])
