"""Training: exact resume, gradient-accumulation invariance, plain-HF output, student building, skipping."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file

import distil.training.loop as train_module
from distil import pipeline
from distil.data.batches import collate
from distil.data.splits import load_data
from distil.errors import DistilError
from distil.generation.cache import TeacherCache
from distil.generation.view import TeacherPrompts, cached_rows
from distil.models import sources, students
from distil.training.loop import lr_lambda, micro_batch_order, train_student
from distil.training.objective import DistillationObjective


def student_tensors(folder) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


def assert_same_weights(a, b):
    ta, tb = student_tensors(a), student_tensors(b)
    assert ta.keys() == tb.keys()
    different = [k for k in ta if not torch.equal(ta[k], tb[k])]
    assert not different, f"tensors differ: {different[:5]}"


def log_lines(out, name="student") -> list[dict]:
    return [json.loads(line) for line in (out / "logs" / f"{name}.jsonl").read_text().splitlines() if line.strip()]


@pytest.fixture
def cached(load):
    """load(*overrides) after the teacher cache has been generated for the tiny recipe."""
    pipeline.generate(load())
    return load


# --- resume -----------------------------------------------------------------------------------------


def test_resumed_run_equals_uninterrupted_run(cached, tmp_path, monkeypatch):
    a = cached("train.baseline=false", f"out={tmp_path / 'A'}")
    b = cached("train.baseline=false", f"out={tmp_path / 'B'}")
    summary_a = pipeline.train(a)["student"]
    assert summary_a["steps"] == 6 and summary_a["resumed_from"] == 0

    # B: killed right after step 4's checkpoint is written.
    original = train_module._save_checkpoint

    def save_then_die(folder, step, *args, **kwargs):
        original(folder, step, *args, **kwargs)
        if step == 4:
            raise KeyboardInterrupt

    monkeypatch.setattr(train_module, "_save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        pipeline.train(b)
    monkeypatch.setattr(train_module, "_save_checkpoint", original)
    out_b = tmp_path / "B"
    assert not (out_b / "student").exists()
    assert sorted(p.name for p in (out_b / "checkpoints" / "student").glob("step-*")) == ["step-0000002", "step-0000004"]
    assert [r["step"] for r in log_lines(out_b)] == [1, 2, 3, 4]

    summary_b = pipeline.train(b, resume=True)["student"]
    assert summary_b["resumed_from"] == 4 and summary_b["steps"] == 6
    assert_same_weights(tmp_path / "A" / "student", out_b / "student")
    # The resumed log has each step once, with the uninterrupted run's losses and learning rates.
    log_a, log_b = log_lines(tmp_path / "A"), log_lines(out_b)
    assert [r["step"] for r in log_b] == [1, 2, 3, 4, 5, 6]
    for ra, rb in zip(log_a, log_b):
        assert ra["loss"] == rb["loss"] and ra["lr"] == rb["lr"], (ra, rb)


def test_resume_from_a_log_with_later_steps_truncates_it(cached, tmp_path):
    """A run killed after logging steps past its last checkpoint logs those steps once on resume."""
    recipe = cached("train.baseline=false", f"out={tmp_path / 'A'}")
    pipeline.train(recipe)
    out = tmp_path / "A"
    # Pretend the run died after step 5 (logged) but before saving the model.
    import shutil

    shutil.rmtree(out / "student")
    lines = (out / "logs" / "student.jsonl").read_text().splitlines()
    (out / "logs" / "student.jsonl").write_text("\n".join(lines[:5]) + "\n")
    summary = pipeline.train(recipe, resume=True)["student"]
    assert summary["resumed_from"] == 4
    assert [r["step"] for r in log_lines(out)] == [1, 2, 3, 4, 5, 6]


def test_resume_ignores_checkpoints_of_a_different_recipe(cached, tmp_path):
    old = cached("train.baseline=false", f"out={tmp_path / 'A'}")
    pipeline.train(old)  # leaves checkpoints step-2 and step-4 behind
    changed = cached("train.baseline=false", f"out={tmp_path / 'A'}", "train.lr=0.01")
    summary = pipeline.train(changed, resume=True)["student"]  # what `distil run` does
    fresh = cached("train.baseline=false", f"out={tmp_path / 'F'}", "train.lr=0.01")
    pipeline.train(fresh)
    assert summary["resumed_from"] == 0
    assert_same_weights(tmp_path / "A" / "student", tmp_path / "F" / "student")


def test_checkpoints_and_logs(cached, tmp_path):
    recipe = cached(f"out={tmp_path / 'run'}")
    summaries = pipeline.train(recipe)
    out = tmp_path / "run"
    for name in ("student", "baseline"):
        assert summaries[name]["steps"] == 6 and summaries[name]["tokens"] > 0
        # Every 2 steps, the last two kept, none at the final step (the model folder is the final state).
        assert sorted(p.name for p in (out / "checkpoints" / name).glob("step-*")) == ["step-0000002", "step-0000004"]
        assert [r["step"] for r in log_lines(out, name)] == [1, 2, 3, 4, 5, 6]
        marker = json.loads((out / name / "distil_train.json").read_text())
        assert marker["alpha"] == (recipe.train.alpha if name == "student" else 1.0)
    # The baseline is trained on cross-entropy only.
    assert all(r["loss"] == pytest.approx(r["ce"]) for r in log_lines(out, "baseline"))
    assert not list(out.glob("*.tmp"))


# --- gradient accumulation ------------------------------------------------------------------------


class RecordingSGD(torch.optim.SGD):
    """Stands in for AdamW: plain SGD (the update is proportional to the gradient) that keeps the gradients."""

    def __init__(self, params, lr, weight_decay=0.0, betas=None):
        super().__init__(params, lr=lr)
        self.seen = []

    @torch.no_grad()
    def step(self, closure=None):
        self.seen.append([p.grad.detach().clone() for g in self.param_groups for p in g["params"]])
        RecordingSGD.last = self
        return super().step(closure)


def one_step(recipe, rows, pad_id, teacher, out, batch_size, grad_accum):
    cfg = recipe.train.model_copy(update=dict(steps=1, batch_size=batch_size, grad_accum=grad_accum,
                                              max_grad_norm=None, warmup=0))
    torch.manual_seed(0)
    student = students.student_from_teacher(teacher, [0, 3])
    summary = train_student(student, rows, cfg, pad_id=pad_id, out_dir=out, run_name=f"b{batch_size}")
    return summary, {k: v.detach().clone() for k, v in student.state_dict().items()}


@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
def test_grad_accumulation_does_not_change_the_step(cached, tmp_path, monkeypatch, optimizer):
    recipe = cached()
    view = TeacherPrompts(recipe)
    train_ex, _ = load_data(recipe)
    rows = cached_rows(recipe, view.keys(train_ex), "train")
    # Rows of different lengths, so micro-batches hold different numbers of target tokens.
    assert len({len(r["token_ids"]) for r in rows}) > 1
    teacher = view.load_model()
    if optimizer == "sgd":
        monkeypatch.setattr(torch.optim, "AdamW", RecordingSGD)
    results = {}
    for bs, accum in [(8, 1), (4, 2), (2, 4)]:
        summary, weights = one_step(recipe, rows, view.tokenizer.pad_token_id, teacher, tmp_path, bs, accum)
        grads = RecordingSGD.last.seen[0] if optimizer == "sgd" else None
        results[(bs, accum)] = (summary, weights, grads)
    ref_summary, ref_weights, ref_grads = results[(8, 1)]
    for key in [(4, 2), (2, 4)]:
        summary, weights, grads = results[key]
        assert summary["tokens"] == ref_summary["tokens"]
        for metric in ("loss", "ce", "kd"):
            assert summary["final"][metric] == pytest.approx(ref_summary["final"][metric], rel=1e-5), (key, metric)
        for name in ref_weights:
            torch.testing.assert_close(weights[name], ref_weights[name], atol=1e-6, rtol=0, msg=f"{key} {name}")
        if grads is not None:
            for g, ref in zip(grads, ref_grads):
                torch.testing.assert_close(g, ref, atol=1e-7, rtol=1e-4)
    changed = any(not torch.equal(ref_weights[n].cpu(), w.cpu()) for n, w in
                  students.student_from_teacher(teacher, [0, 3]).state_dict().items())
    assert changed, "one step must change the weights"


def test_chunked_objective_equals_unchunked(cached):
    recipe = cached()
    view = TeacherPrompts(recipe)
    rows = list(TeacherCache(recipe.cache_dir).read().values())[:6]
    batch = collate(rows, view.tokenizer.pad_token_id)
    teacher = view.load_model()
    results = []
    for chunk in (10_000, 3):
        student = students.student_from_teacher(teacher, [0, 3])
        objective = DistillationObjective(student, alpha=0.3, temperature=2.0, chunk_tokens=chunk)
        loss, ce, kd, _ = objective(batch)
        loss.backward()
        results.append((loss.detach(), ce.detach(), kd.detach(), [p.grad.clone() for p in student.parameters()]))
    (l1, c1, k1, g1), (l2, c2, k2, g2) = results
    torch.testing.assert_close(l1, l2)
    torch.testing.assert_close(c1, c2)
    torch.testing.assert_close(k1, k2)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_collate_targets_line_up(cached):
    recipe = cached()
    rows = list(TeacherCache(recipe.cache_dir).read().values())[:5]
    batch = collate(rows, pad_id=0)
    flat = batch.input_ids.flatten()
    width = batch.input_ids.shape[1]
    assert batch.targets.tolist() == [t for r in rows for t in r["token_ids"]]
    offset = 0
    for i, row in enumerate(rows):
        seq = row["prompt_ids"] + row["token_ids"]
        n = len(row["token_ids"])
        pos = batch.target_pos[offset:offset + n]
        # The input at each target position is the token just before the target.
        assert flat[pos].tolist() == seq[len(row["prompt_ids"]) - 1:-1]
        assert (pos // width == i).all()
        offset += n


def test_public_api_names_are_the_stage_functions():
    import distil.evaluation.scoring  # noqa: F401  (what any training or evaluation run does)
    import distil.training.loop  # noqa: F401
    from distil import evaluate, generate, run, train

    assert callable(generate) and callable(run)
    assert callable(train) and callable(evaluate)


def test_lr_schedule_and_batch_order():
    assert lr_lambda(0, warmup=2, total=10, schedule="cosine", min_ratio=0.1) == 0.5
    assert lr_lambda(2, warmup=2, total=10, schedule="cosine", min_ratio=0.1) == 1.0
    assert lr_lambda(10, warmup=2, total=10, schedule="cosine", min_ratio=0.1) == pytest.approx(0.1)
    assert lr_lambda(6, warmup=2, total=10, schedule="linear", min_ratio=0.0) == pytest.approx(0.5)
    assert lr_lambda(7, warmup=0, total=10, schedule="constant", min_ratio=0.1) == 1.0
    whole = micro_batch_order(10, 3, seed=5, start=0, count=7)
    assert micro_batch_order(10, 3, seed=5, start=4, count=3) == whole[4:]
    assert sorted(i for b in whole[:3] for i in b) == sorted(set(i for b in whole[:3] for i in b))
    assert micro_batch_order(10, 3, seed=6, start=0, count=3) != whole[:3]


# --- the saved student is a plain Hugging Face model -----------------------------------------------------


PLAIN_LOAD = textwrap.dedent("""
    import sys
    sys.modules["distil"] = None  # any import of distil now fails
    try:
        import distil  # noqa: F401
    except ImportError:
        pass
    else:
        raise SystemExit("distil is importable")
    import json, torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    torch.set_num_threads(1)
    folder, ids_json, out = sys.argv[1:4]
    model, info = AutoModelForCausalLM.from_pretrained(folder, output_loading_info=True)
    bad = {k: v for k, v in info.items() if v and k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    if bad:
        raise SystemExit(f"loading info: {bad}")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert tokenizer.chat_template, "the tokenizer keeps its chat template"
    with torch.no_grad():
        logits = model.eval()(input_ids=torch.tensor(json.loads(ids_json))).logits
    torch.save({"logits": logits, "cls": type(model).__name__, "layers": model.config.num_hidden_layers}, out)
""")


def test_student_folder_loads_with_plain_transformers(cached, tmp_path):
    recipe = cached("train.baseline=false", f"out={tmp_path / 'run'}")
    pipeline.train(recipe)
    folder = tmp_path / "run" / "student"
    ids = [[5, 17, 42, 9, 3, 100, 7], [2, 8, 8, 30, 31, 32, 33]]
    out = tmp_path / "logits.pt"
    proc = subprocess.run([sys.executable, "-c", PLAIN_LOAD, str(folder), json.dumps(ids), str(out)],
                          capture_output=True, text=True, timeout=120, env={"OMP_NUM_THREADS": "1", "PATH": ""})
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = torch.load(out)
    assert got["cls"] == "LlamaForCausalLM" and got["layers"] == 2
    model = sources.load_causal_lm(folder, device="cpu")
    with torch.no_grad():
        expected = model(input_ids=torch.tensor(ids)).logits
    torch.testing.assert_close(got["logits"], expected, atol=1e-5, rtol=0)
    # The weights really are the trained ones, not a fresh copy of the teacher's layers.
    teacher = sources.load_causal_lm(recipe.teacher.model, device="cpu")
    untrained = students.student_from_teacher(teacher, [0, 3])
    assert not torch.equal(untrained.model.layers[0].self_attn.q_proj.weight, model.model.layers[0].self_attn.q_proj.weight)


# --- building the student ---------------------------------------------------------------------------


@pytest.fixture
def teacher(tiny_model_dir):
    return sources.load_causal_lm(tiny_model_dir, device="cpu")


def test_student_from_teacher_copies_chosen_layers(teacher):
    student = students.student_from_teacher(teacher, [0, 3])
    assert student.config.num_hidden_layers == 2
    assert sources.count_params(student) < sources.count_params(teacher)
    for j, t in enumerate([0, 3]):
        s_params = dict(student.model.layers[j].named_parameters())
        t_params = dict(teacher.model.layers[t].named_parameters())
        assert s_params.keys() == t_params.keys()
        for name in s_params:
            assert torch.equal(s_params[name], t_params[name]), (j, name)
    assert torch.equal(student.model.embed_tokens.weight, teacher.model.embed_tokens.weight)
    assert torch.equal(student.model.norm.weight, teacher.model.norm.weight)
    assert student.get_output_embeddings().weight is student.get_input_embeddings().weight  # still tied
    # A copy, not shared storage: training the student must not change the teacher.
    assert student.model.layers[0].mlp.up_proj.weight.data_ptr() != teacher.model.layers[0].mlp.up_proj.weight.data_ptr()


def test_student_with_all_layers_is_the_teacher(teacher):
    student = students.student_from_teacher(teacher, [0, 1, 2, 3]).eval()
    ids = torch.tensor([[4, 9, 30, 3, 77]])
    with torch.no_grad():
        torch.testing.assert_close(student(input_ids=ids).logits, teacher(input_ids=ids).logits, atol=1e-6, rtol=0)


def test_student_from_teacher_narrows_mlp(teacher):
    keep = 16
    student = students.student_from_teacher(teacher, [3, 1], intermediate_size=keep)
    assert student.config.intermediate_size == keep
    for j, t in enumerate([3, 1]):
        s_mlp, t_mlp = student.model.layers[j].mlp, teacher.model.layers[t].mlp
        assert s_mlp.gate_proj.weight.shape == (keep, 32)
        assert s_mlp.up_proj.weight.shape == (keep, 32)
        assert s_mlp.down_proj.weight.shape == (32, keep)
        # The kept neurons: the same ones in all three matrices, in order, the most important by weight norms.
        score = t_mlp.down_proj.weight.norm(dim=0) * t_mlp.gate_proj.weight.norm(dim=1) * t_mlp.up_proj.weight.norm(dim=1)
        chosen = score.topk(keep).indices.sort().values
        assert torch.equal(s_mlp.gate_proj.weight, t_mlp.gate_proj.weight[chosen])
        assert torch.equal(s_mlp.up_proj.weight, t_mlp.up_proj.weight[chosen])
        assert torch.equal(s_mlp.down_proj.weight, t_mlp.down_proj.weight[:, chosen])
        # Attention and norms are copied unchanged.
        assert torch.equal(student.model.layers[j].self_attn.o_proj.weight, teacher.model.layers[t].self_attn.o_proj.weight)
        assert torch.equal(student.model.layers[j].post_attention_layernorm.weight,
                           teacher.model.layers[t].post_attention_layernorm.weight)
    # The narrowed MLP computes the teacher's MLP restricted to the kept neurons.
    x = torch.randn(2, 5, 32)
    t_mlp = teacher.model.layers[3].mlp
    score = t_mlp.down_proj.weight.norm(dim=0) * t_mlp.gate_proj.weight.norm(dim=1) * t_mlp.up_proj.weight.norm(dim=1)
    chosen = score.topk(keep).indices
    with torch.no_grad():
        hidden = t_mlp.act_fn(t_mlp.gate_proj(x)) * t_mlp.up_proj(x)
        expected = hidden[..., chosen] @ t_mlp.down_proj.weight[:, chosen].T
        torch.testing.assert_close(student.model.layers[0].mlp(x), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("layers, size, field", [([0, 4], None, "layers"), ([-1], None, "layers"),
                                                  ([0], 65, "intermediate_size")])
def test_student_from_teacher_rejects_bad_shapes(teacher, layers, size, field):
    with pytest.raises(DistilError) as info:
        students.student_from_teacher(teacher, layers, size)
    assert info.value.field.endswith(field)


def test_other_student_sources(cached, tmp_path, tiny_model_dir):
    """student.config (random init from the teacher's config with overrides) and student.model (a ready model)."""
    recipe = cached("train.baseline=false", f"out={tmp_path / 'cfg'}", "student.from_teacher=null",
                    "student.config={num_hidden_layers: 1, intermediate_size: 16}")
    assert pipeline.train(recipe)["student"]["steps"] == 6
    student = sources.load_causal_lm(tmp_path / "cfg" / "student", device="cpu")
    assert student.config.num_hidden_layers == 1 and student.config.intermediate_size == 16
    assert student.config.hidden_size == 32  # the rest of the teacher's config is kept

    # A ready student: the 1-layer model just trained, trained again from its saved folder.
    recipe = cached("train.baseline=false", f"out={tmp_path / 'ready'}", "student.from_teacher=null",
                    f"student.model={tmp_path / 'cfg' / 'student'}")
    assert pipeline.train(recipe)["student"]["steps"] == 6
    student = sources.load_causal_lm(tmp_path / "ready" / "student", device="cpu")
    assert student.config.num_hidden_layers == 1 and student.config.intermediate_size == 16


# --- skipping finished work ---------------------------------------------------------------------------


def test_second_train_is_skipped(cached, tmp_path, monkeypatch):
    recipe = cached(f"out={tmp_path / 'run'}")
    first = pipeline.train(recipe)
    assert not first["student"].get("skipped") and not first["baseline"].get("skipped")
    before = student_tensors(tmp_path / "run" / "student")

    def no_model(*args, **kwargs):
        raise AssertionError("a skipped train must not load a model")

    monkeypatch.setattr(sources, "load_causal_lm", no_model)
    second = pipeline.train(recipe)
    assert second["student"]["skipped"] is True and second["baseline"]["skipped"] is True
    assert second["student"]["steps"] == 6
    after = student_tensors(tmp_path / "run" / "student")
    assert all(torch.equal(before[k], after[k]) for k in before)
    monkeypatch.undo()
    # A changed training setting is not skipped.
    changed = pipeline.train(cached(f"out={tmp_path / 'run'}", "train.steps=3", "train.checkpoint_every=10",
                                    "train.baseline=false"))
    assert not changed["student"].get("skipped")
    assert changed["student"]["steps"] == 3 and changed["student"]["resumed_from"] == 0
    assert not torch.equal(before["model.layers.0.mlp.up_proj.weight"],
                           student_tensors(tmp_path / "run" / "student")["model.layers.0.mlp.up_proj.weight"])


def test_retrain_changed_recipe_in_same_out_dir(cached, tmp_path):
    pipeline.train(cached(f"out={tmp_path / 'run'}", "train.baseline=false"))
    changed = pipeline.train(cached(f"out={tmp_path / 'run'}", "train.baseline=false", "train.lr=0.01"))
    assert changed["student"]["steps"] == 6 and changed["student"]["resumed_from"] == 0


@pytest.mark.parametrize("loss", ["reverse_kl", "jsd", "skew_kl", "tvd"])
def test_objective_uses_the_recipe_divergence(tiny_model_dir, loss):
    """train.loss picks the sparse divergence: the objective's kd sum equals the loss function's own."""
    from distil.generation.decoding import generate_batch
    from distil.training.losses import divergence

    model = sources.load_causal_lm(tiny_model_dir, device="cpu")
    prompts = [[5, 6, 7], [8, 9, 10, 11]]
    rows = [g.__dict__ for g in generate_batch(model, prompts, pad_id=0, stop_ids={3}, max_new_tokens=5, top_k=4)]
    batch = collate(rows, 0)
    params = {"jsd": {"beta": 0.3}, "skew_kl": {"skew": 0.2}}.get(loss, {})
    objective = DistillationObjective(model, alpha=0.25, temperature=1.5, loss=loss, loss_params={loss: params})
    with torch.no_grad():
        total, ce, kd, _ = objective(batch)
        hidden = model.base_model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).last_hidden_state
        logits = model.get_output_embeddings()(hidden.flatten(0, 1)[batch.target_pos])
        expected = divergence(loss, **params)[1](logits, batch.topk_ids, batch.topk_logprobs, batch.tail_logprob,
                                                 temperature=1.5, reduction="sum")
    assert kd.item() == pytest.approx(expected.item(), rel=1e-5)
    assert total.item() == pytest.approx(0.25 * ce.item() + 0.75 * 1.5 ** 2 * kd.item(), rel=1e-5)


def test_recipe_rejects_unknown_loss(load):
    from distil.errors import DistilError

    with pytest.raises(DistilError) as err:
        load("train.loss=kl_forward")
    assert err.value.field == "train.loss"


def test_baseline_is_not_retrained_when_only_the_divergence_changes(cached, tmp_path):
    first = pipeline.train(cached(f"out={tmp_path / 'run'}"))
    again = pipeline.train(cached(f"out={tmp_path / 'run'}", "train.loss=reverse_kl", "train.alpha=0.3"))
    assert not first["baseline"].get("skipped") and again["baseline"].get("skipped")
    assert not again["student"].get("skipped")


def test_a_weighted_sum_of_divergences_is_the_sum_of_its_parts(tiny_model_dir):
    """train.loss: {forward_kl: 0.6, tvd: 0.4} gives kd = 0.6 * forward KL + 0.4 * TVD (each its own sparse function)."""
    from distil.generation.decoding import generate_batch
    from distil.training.losses import sparse_forward_kl, sparse_tvd

    model = sources.load_causal_lm(tiny_model_dir, device="cpu")
    rows = [g.__dict__ for g in generate_batch(model, [[5, 6, 7], [8, 9, 10, 11]], pad_id=0, stop_ids={3},
                                               max_new_tokens=5, top_k=4)]
    batch = collate(rows, 0)
    objective = DistillationObjective(model, alpha=0.25, temperature=1.5, loss={"forward_kl": 0.6, "tvd": 0.4})
    with torch.no_grad():
        _, _, kd, _ = objective(batch)
        hidden = model.base_model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).last_hidden_state
        logits = model.get_output_embeddings()(hidden.flatten(0, 1)[batch.target_pos])
        args = (logits, batch.topk_ids, batch.topk_logprobs, batch.tail_logprob)
        expected = 0.6 * sparse_forward_kl(*args, temperature=1.5, reduction="sum") + \
            0.4 * sparse_tvd(*args, temperature=1.5, reduction="sum")
    assert kd.item() == pytest.approx(expected.item(), rel=1e-5)


def test_recipe_takes_a_weighted_sum_of_divergences(load):
    from distil.errors import DistilError

    assert load("train.loss={forward_kl: 0.5, tvd: 0.5}").train.loss == {"forward_kl": 0.5, "tvd": 0.5}
    with pytest.raises(DistilError) as err:
        load("train.loss={forward_kl: 0.5, tvd: -1}")
    assert err.value.field == "train.loss.tvd" and "greater than 0" in str(err.value)
    with pytest.raises(DistilError) as err:
        load("train.loss={forward_kl: 0.5, kl_forward: 0.5}")
    assert err.value.field == "train.loss.kl_forward"
    with pytest.raises(DistilError) as err:
        load("train.loss={}")
    assert err.value.field == "train.loss" and "at least 1 item" in str(err.value)
