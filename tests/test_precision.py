"""train.mixed_precision (bf16 autocast, float32 master weights) and train.gradient_checkpointing."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from distil import pipeline
from distil.data.batches import collate
from distil.errors import DistilError
from distil.generation.cache import TeacherCache
from distil.generation.view import TeacherPrompts
from distil.models import students
from distil.training.memory import saved_activation_bytes
from distil.training.objective import DistillationObjective


def log_lines(out, name="student") -> list[dict]:
    return [json.loads(line) for line in (out / "logs" / f"{name}.jsonl").read_text().splitlines() if line.strip()]


@pytest.fixture
def cached(load):
    pipeline.generate(load())
    return load


TRAIN = ("train.baseline=false", "train.steps=12", "train.lr=0.01", "train.warmup=0", "train.schedule=constant")


def test_bf16_mixed_precision_trains_with_float32_weights(cached, tmp_path):
    fp32 = cached(*TRAIN, f"out={tmp_path / 'fp32'}")
    bf16 = cached(*TRAIN, f"out={tmp_path / 'bf16'}", "train.mixed_precision=bf16")
    pipeline.train(fp32)
    pipeline.train(bf16)
    log32, log16 = log_lines(tmp_path / "fp32"), log_lines(tmp_path / "bf16")
    print("fp32 loss", [r["loss"] for r in log32], "\nbf16 loss", [r["loss"] for r in log16])
    # Step 1 sees the same weights and batch: the losses differ only by bf16 rounding (8 mantissa bits)...
    assert log16[0]["loss"] == pytest.approx(log32[0]["loss"], rel=2e-2)
    # ...and they do differ, so the forward really ran under autocast.
    assert log16[0]["loss"] != log32[0]["loss"]
    assert log16[-1]["loss"] < 0.8 * log16[0]["loss"], [r["loss"] for r in log16]
    weights = load_file(str(tmp_path / "bf16" / "student" / "model.safetensors"))
    assert {t.dtype for t in weights.values()} == {torch.float32}
    assert json.loads((tmp_path / "bf16" / "student" / "config.json").read_text())["dtype"] == "float32"


def test_mixed_precision_needs_float32_student_weights(load):
    with pytest.raises(DistilError) as e:
        load("train.mixed_precision=bf16", "student.dtype=bfloat16")
    assert e.value.field == "student.dtype"


def _objective_step(teacher, batch, checkpointing: bool):
    torch.manual_seed(0)
    student = students.student_from_teacher(teacher, [0, 1, 2, 3])
    if checkpointing:
        student.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    student.train()
    objective = DistillationObjective(student, alpha=0.3, temperature=2.0)
    calls = []
    for layer in student.model.layers:  # counts MLP runs (module hooks do not run in the recompute)
        layer.mlp.forward = (lambda f: lambda x: calls.append(1) or f(x))(layer.mlp.forward)
    loss, saved = saved_activation_bytes(lambda: objective(batch)[0], objective)
    forwards = len(calls)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in student.named_parameters()}, saved, forwards, len(calls)


def test_gradient_checkpointing_same_gradients_less_activation_memory(cached):
    recipe = cached()
    view = TeacherPrompts(recipe)
    batch = collate(list(TeacherCache(recipe.cache_dir).read().values())[:8], view.tokenizer.pad_token_id)
    teacher = view.load_model()
    loss_a, grads_a, saved_a, fwd_a, total_a = _objective_step(teacher, batch, checkpointing=False)
    loss_b, grads_b, saved_b, fwd_b, total_b = _objective_step(teacher, batch, checkpointing=True)
    torch.testing.assert_close(loss_b, loss_a)
    for name in grads_a:
        torch.testing.assert_close(grads_b[name], grads_a[name], atol=1e-6, rtol=1e-5, msg=name)
    # Checkpointed: each of the 4 layers runs again in backward, and keeps only its input until then.
    assert (fwd_a, total_a) == (4, 4) and (fwd_b, total_b) == (4, 8)
    print(f"saved for backward: {saved_a} B plain, {saved_b} B checkpointed")
    assert saved_b < 0.7 * saved_a, (saved_a, saved_b)


def test_gradient_checkpointing_run_equals_plain_run(cached, tmp_path):
    plain = cached(*TRAIN[:2], "train.steps=4", f"out={tmp_path / 'plain'}")
    ckpt = cached(*TRAIN[:2], "train.steps=4", f"out={tmp_path / 'ckpt'}", "train.gradient_checkpointing=true")
    pipeline.train(plain)
    pipeline.train(ckpt)
    a = load_file(str(tmp_path / "plain" / "student" / "model.safetensors"))
    b = load_file(str(tmp_path / "ckpt" / "student" / "model.safetensors"))
    for name in a:
        torch.testing.assert_close(b[name], a[name], atol=1e-6, rtol=1e-5, msg=name)
    # The saved student is a plain model: checkpointing is off again.
    assert "gradient_checkpointing" not in json.loads((tmp_path / "ckpt" / "student" / "config.json").read_text())
