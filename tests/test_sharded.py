"""The training loop under `accelerate launch` with the shipped configs (configs/accelerate/).

On CPU: ddp.yaml with 2 processes (gloo) equals 1 process; fsdp2.yaml is refused with the reason
(Accelerate runs FSDP only on accelerator devices; on CPU it would silently be DDP). With GPUs: FSDP2
with 2 processes equals 1 process, a resumed FSDP2 run (sharded checkpoints) equals an uninterrupted
one, and DeepSpeed ZeRO-2/3 equal 1 process.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from distil import pipeline
from distil.data.splits import load_data
from distil.generation.view import TeacherPrompts, cached_rows

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs" / "accelerate"
GPUS = torch.cuda.device_count()
needs_gpus = pytest.mark.skipif(GPUS < 2, reason="FSDP2 / DeepSpeed run on GPUs only (Accelerate ignores them on "
                                                 "CPU); 2 processes need 2 GPUs")

# Trains the tiny student (SGD, so a wrongly scaled gradient shows) and saves its weights from the main process.
WORKER = textwrap.dedent("""
    import argparse, json, pathlib
    import torch
    from safetensors.torch import save_file
    from accelerate import PartialState
    from distil.models import sources, students
    from distil.config.recipe import TrainConfig
    from distil.training import loop, sharding

    p = argparse.ArgumentParser()
    for name in ("model_dir", "rows", "out"):
        p.add_argument(name)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--die-at", type=int, default=0)
    p.add_argument("--resume", action="store_true")
    a = p.parse_args()
    torch.set_num_threads(1)
    torch.optim.AdamW = lambda params, lr, weight_decay, betas: torch.optim.SGD(params, lr=lr, momentum=0.9)
    if a.die_at:
        for module, name in ((sharding, "save_sharded_checkpoint"), (loop, "_save_checkpoint")):
            original = getattr(module, name)
            def save_then_die(*args, _original=original, **kwargs):
                _original(*args, **kwargs)
                if any(x == a.die_at for x in args if isinstance(x, int)):
                    raise KeyboardInterrupt
            setattr(module, name, save_then_die)
    rows = json.load(open(a.rows))
    teacher = sources.load_causal_lm(a.model_dir, device="cpu")
    torch.manual_seed(0)
    student = students.student_from_teacher(teacher, [0, 3])
    cfg = TrainConfig(steps=a.steps, batch_size=a.batch_size, grad_accum=a.grad_accum, warmup=1, lr=0.5,
                      alpha=0.3, temperature=2.0, max_grad_norm=None, checkpoint_every=2)
    summary = loop.train_student(student, rows, cfg, pad_id=0, out_dir=pathlib.Path(a.out), run_name="s",
                                 resume=a.resume, fingerprint="f")
    if PartialState().is_main_process:
        save_file({k: v.detach().cpu().clone().contiguous() for k, v in student.state_dict().items()
                   if k != "lm_head.weight"}, a.out + "/weights.safetensors")
        json.dump({"processes": PartialState().num_processes, **summary}, open(a.out + "/summary.json", "w"))
    if torch.distributed.is_initialized():  # as distil.cli does: gloo left open can abort the exit
        torch.distributed.destroy_process_group()
""")


def _run(cmd: list[str], cwd, ok: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO / "src")}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=cwd, timeout=600)
    if ok:
        assert proc.returncode == 0, proc.stderr[-8000:]
    return proc


def _launch(config: str, processes: int, *args) -> list[str]:
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CONFIGS / config),
            "--num_processes", str(processes), "--main_process_port", "29533", *map(str, args)]


@pytest.fixture
def setup(load, tmp_path, tiny_model_dir):
    """(worker script, model dir, rows file) for the tiny recipe's cached rows."""
    recipe = load()
    pipeline.generate(recipe)
    view = TeacherPrompts(recipe)
    train_ex, _ = load_data(recipe)
    rows_file = tmp_path / "rows.json"
    rows_file.write_text(json.dumps(cached_rows(recipe, view.keys(train_ex), "train")))
    worker = tmp_path / "worker.py"
    worker.write_text(WORKER)
    return worker, tiny_model_dir, rows_file


def _weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "weights.safetensors"))


def _assert_same(a: Path, b: Path, atol=1e-5) -> None:
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    for name in wa:
        torch.testing.assert_close(wb[name], wa[name], atol=atol, rtol=1e-4, msg=name)
    sa, sb = (json.loads((d / "summary.json").read_text()) for d in (a, b))
    assert sa["tokens"] == sb["tokens"]
    assert sb["final"]["loss"] == pytest.approx(sa["final"]["loss"], rel=1e-4)


def _two_processes_equal_one(setup, tmp_path, config: str) -> None:
    worker, model_dir, rows = setup
    one, two = tmp_path / "one", tmp_path / "two"
    # One process: 2 micro-batches of 4 accumulated. Two processes: one micro-batch of 4 each.
    _run([sys.executable, str(worker), model_dir, rows, one, "--grad-accum", "2"], tmp_path)
    _run(_launch(config, 2, worker, model_dir, rows, two), tmp_path)
    assert json.loads((two / "summary.json").read_text())["processes"] == 2
    _assert_same(one, two)


@pytest.mark.slow
def test_ddp_config_two_processes_equal_one(setup, tmp_path):
    _two_processes_equal_one(setup, tmp_path, "ddp.yaml")


@pytest.mark.skipif(GPUS > 0, reason="checks the CPU refusal")
def test_fsdp_config_on_cpu_is_refused_naming_the_reason(load, recipe_path, tmp_path):
    pipeline.generate(load())
    proc = _run(_launch("fsdp2.yaml", 2, "-m", "distil.cli", "train", recipe_path), tmp_path, ok=False)
    assert proc.returncode == 1, proc.stderr[-4000:]
    assert 'field "--config_file": the accelerate config asks for FSDP, but Accelerate runs it only on GPUs' \
           in proc.stderr
    assert "DistilError" not in proc.stderr  # one line from the CLI, not a traceback
    assert not (tmp_path / "out" / "student").exists()


@needs_gpus
@pytest.mark.parametrize("config", ["fsdp2.yaml", "deepspeed_zero2.yaml", "deepspeed_zero3.yaml"])
def test_sharded_two_processes_equal_one(setup, tmp_path, config):
    if config.startswith("deepspeed") and importlib.util.find_spec("deepspeed") is None:
        pytest.skip("deepspeed is not installed (pip install deepspeed, with a CUDA torch)")
    _two_processes_equal_one(setup, tmp_path, config)


@needs_gpus
def test_fsdp2_resumed_run_equals_uninterrupted_run(setup, tmp_path):
    worker, model_dir, rows = setup
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    _run(_launch("fsdp2.yaml", 2, worker, model_dir, rows, whole, "--steps", "6"), tmp_path)
    died = _run(_launch("fsdp2.yaml", 2, worker, model_dir, rows, cut, "--steps", "6", "--die-at", "4"), tmp_path,
                ok=False)
    assert died.returncode != 0
    ckpts = sorted(p.name for p in (cut / "checkpoints" / "s").glob("step-*"))
    assert ckpts == ["step-0000002", "step-0000004"]
    # Sharded: one file set per process under each checkpoint, no full model file.
    assert not (cut / "checkpoints" / "s" / "step-0000004" / "model.safetensors").exists()
    _run(_launch("fsdp2.yaml", 2, worker, model_dir, rows, cut, "--steps", "6", "--resume"), tmp_path)
    assert json.loads((cut / "summary.json").read_text())["resumed_from"] == 4
    _assert_same(whole, cut, atol=0)


def _log(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "logs" / "student.jsonl").read_text().splitlines() if line.strip()]


def test_save_state_checkpoints_resume_exactly_on_one_process(load, tmp_path, monkeypatch):
    """The checkpoint and final-save path FSDP2 and ZeRO take (Accelerate's save_state / load_state, the
    student gathered with get_state_dict), forced on one CPU process where Accelerate cannot shard: it ends
    on the plain path's weights, and a run killed after step 4's checkpoint and resumed ends on the
    uninterrupted run's weights and log."""
    from distil.training import sharding

    pipeline.generate(load())
    args = ("train.baseline=false",)
    pipeline.train(load(*args, f"out={tmp_path / 'plain'}"))
    monkeypatch.setattr(sharding, "is_sharded", lambda accelerator: True)
    pipeline.train(load(*args, f"out={tmp_path / 'whole'}"))

    original = sharding.save_sharded_checkpoint

    def save_then_die(accelerator, folder, step, *rest, **kwargs):
        original(accelerator, folder, step, *rest, **kwargs)
        if step == 4:
            raise KeyboardInterrupt

    cut = load(*args, f"out={tmp_path / 'cut'}")
    with monkeypatch.context() as m:
        m.setattr(sharding, "save_sharded_checkpoint", save_then_die)
        with pytest.raises(KeyboardInterrupt):
            pipeline.train(cut)
    ckpts = tmp_path / "cut" / "checkpoints" / "student"
    assert sorted(p.name for p in ckpts.glob("step-*")) == ["step-0000002", "step-0000004"]
    assert not list(ckpts.glob(".tmp-*"))
    written = {p.name for p in (ckpts / "step-0000004").iterdir()}
    assert {"train_state.pt", "optimizer.bin", "random_states_0.pkl"} <= written, written
    summary = pipeline.train(cut, resume=True)["student"]
    assert summary["resumed_from"] == 4

    plain, whole, resumed = (load_file(str(tmp_path / d / "student" / "model.safetensors"))
                             for d in ("plain", "whole", "cut"))
    assert plain.keys() == whole.keys() == resumed.keys()
    for name in plain:
        assert torch.equal(whole[name], plain[name]), name
        assert torch.equal(resumed[name], whole[name]), name
    assert [(r["step"], r["loss"], r["lr"]) for r in _log(tmp_path / "cut")] == \
           [(r["step"], r["loss"], r["lr"]) for r in _log(tmp_path / "whole")]


PLUGIN = textwrap.dedent("""
    import json, os
    from accelerate.utils import FullyShardedDataParallelPlugin
    p = FullyShardedDataParallelPlugin()  # built from the environment `accelerate launch` set from the config
    if os.environ.get("RANK", "0") == "0":
        print("PLUGIN " + json.dumps({"version": p.fsdp_version, "state_dict_type": p.state_dict_type.name,
                                      "reshard_after_forward": p.reshard_after_forward,
                                      "auto_wrap": p.auto_wrap_policy.__name__,
                                      "activation_checkpointing": p.activation_checkpointing}))
""")


def test_shipped_configs_are_what_the_docs_say(tmp_path):
    from accelerate.commands.config.config_args import ClusterConfig

    # Accelerate's own parser (it refuses unknown keys) reads each one.
    engines = {name: ClusterConfig.from_yaml_file(str(CONFIGS / f"{name}.yaml"))
               for name in ("ddp", "fsdp2", "deepspeed_zero2", "deepspeed_zero3")}
    assert {n: c.distributed_type.value for n, c in engines.items()} == {
        "ddp": "MULTI_GPU", "fsdp2": "FSDP", "deepspeed_zero2": "DEEPSPEED", "deepspeed_zero3": "DEEPSPEED"}
    assert [engines[n].deepspeed_config["zero_stage"] for n in ("deepspeed_zero2", "deepspeed_zero3")] == [2, 3]
    assert engines["deepspeed_zero3"].deepspeed_config["zero3_save_16bit_model"] is True  # get_state_dict needs it
    assert all(c.mixed_precision == "no" for c in engines.values())  # the recipe's train.mixed_precision decides
    # What FSDP plugin a process launched with fsdp2.yaml builds: version 2, full shard, sharded checkpoints.
    script = tmp_path / "plugin.py"
    script.write_text(PLUGIN)
    out = _run(_launch("fsdp2.yaml", 2, script), tmp_path).stdout
    plugin = json.loads(out.split("PLUGIN ", 1)[1].splitlines()[0])
    assert plugin == {"version": 2, "state_dict_type": "SHARDED_STATE_DICT", "reshard_after_forward": True,
                      "auto_wrap": "transformer_auto_wrap_policy", "activation_checkpointing": False}
