"""Training modes (supervised / sequence / on_policy) and hidden-state matching."""

from __future__ import annotations

import pytest
import torch
import yaml
from conftest import die_after_checkpoint, tiny_recipe_dict
from test_train import assert_same_weights, log_lines, student_tensors
from transformers import AutoModelForCausalLM

import distil.training.loop as train_module
from distil import pipeline
from distil.config.loading import load_recipe
from distil.data.batches import collate
from distil.data.splits import load_data
from distil.errors import DistilError
from distil.generation.view import TeacherPrompts, cached_rows
from distil.models import sources, students
from distil.training.objective import DistillationObjective
from distil.training.online import teacher_forward


@pytest.fixture
def cached(load):
    pipeline.generate(load())
    return load


def _train_killed_then_resumed(recipe, monkeypatch, kill_at: int = 4):
    """Train, die right after the checkpoint of step `kill_at`, then resume."""
    die_after_checkpoint(monkeypatch, train_module, kill_at, lambda: pipeline.train(recipe, resume=True))
    return pipeline.train(recipe, resume=True)


def test_sequence_mode_is_cross_entropy_on_the_teacher_text(cached, tmp_path):
    """mode: sequence ignores the divergence: the student equals the CE baseline."""
    recipe = cached("train.mode=sequence", "train.loss=reverse_kl", f"out={tmp_path / 'seq'}")
    pipeline.train(recipe)
    assert_same_weights(tmp_path / "seq" / "student", tmp_path / "seq" / "baseline")
    for line in log_lines(tmp_path / "seq"):
        assert line["loss"] == pytest.approx(line["ce"])


def test_on_policy_with_lambda_zero_equals_supervised(cached, tmp_path):
    pipeline.train(cached("train.baseline=false", f"out={tmp_path / 'sup'}"))
    pipeline.train(cached("train.baseline=false", "train.mode=on_policy", "train.lambda=0", f"out={tmp_path / 'gkd'}"))
    assert_same_weights(tmp_path / "sup" / "student", tmp_path / "gkd" / "student")
    assert all(line["on_policy_share"] == 0 for line in log_lines(tmp_path / "gkd"))


def test_teacher_scoring_reproduces_the_cached_targets(load, tmp_path):
    """Scoring the teacher's own text online gives the top-k and tail `distil generate` stored (float32 rows)."""
    recipe = load("generate.cache_format=float32", f"cache={tmp_path / 'exact-cache'}")
    pipeline.generate(recipe)
    view = TeacherPrompts(recipe)
    train_ex, _ = load_data(recipe)
    rows = cached_rows(recipe, view.keys(train_ex), "train")[:6]
    teacher = view.load_model()
    cached_batch = collate(rows, view.tokenizer.pad_token_id)
    scored = collate([{"prompt_ids": r["prompt_ids"], "token_ids": r["token_ids"]} for r in rows],
                     view.tokenizer.pad_token_id)
    assert scored.topk_ids.shape == (cached_batch.targets.numel(), 0)
    teacher_forward(teacher, scored, top_k=cached_batch.topk_ids.shape[1])
    torch.testing.assert_close(scored.topk_logprobs, cached_batch.topk_logprobs, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(scored.tail_logprob, cached_batch.tail_logprob, atol=1e-4, rtol=1e-3)
    assert (scored.topk_ids[:, 0] == cached_batch.topk_ids[:, 0]).all()


def test_on_policy_student_writes_and_resumes_exactly(cached, tmp_path, monkeypatch):
    """lambda = 1: every micro-batch is the student's own text, scored by the teacher (divergence
    only); a run killed mid-way and resumed ends with the uninterrupted run's weights."""
    seen = []
    original = train_module.collate

    def spy(rows, pad_id):
        seen.append(rows)
        return original(rows, pad_id)

    monkeypatch.setattr(train_module, "collate", spy)
    a = cached("train.baseline=false", "train.mode=on_policy", "train.lambda=1", f"out={tmp_path / 'A'}")
    pipeline.train(a)
    logs = log_lines(tmp_path / "A")
    assert all(line["on_policy_share"] == 1 for line in logs)
    for line in logs:  # alpha is 0 on the student's own text: loss = T^2 * divergence
        assert line["loss"] == pytest.approx(line["kd"]) and line["kd"] > 0
    cached_texts = {tuple(r["token_ids"]) for r in cached_rows(
        a, TeacherPrompts(a).keys(load_data(a)[0]), "train")}
    written = [tuple(r["token_ids"]) for rows in seen for r in rows]
    assert written and "topk_ids" not in seen[0][0]
    assert sum(t not in cached_texts for t in written) > len(written) // 2

    b = cached("train.baseline=false", "train.mode=on_policy", "train.lambda=0.5", f"out={tmp_path / 'B'}")
    c = cached("train.baseline=false", "train.mode=on_policy", "train.lambda=0.5", f"out={tmp_path / 'C'}")
    pipeline.train(b)
    shares = [line["on_policy_share"] for line in log_lines(tmp_path / "B")]
    assert 0 < sum(shares) < len(shares)
    summary = _train_killed_then_resumed(c, monkeypatch)
    assert summary["student"]["resumed_from"] == 4
    assert_same_weights(tmp_path / "B" / "student", tmp_path / "C" / "student")


def _narrow_student_recipe(tmp_path, tiny_model_dir, **train) -> object:
    """The tiny recipe with a randomly initialised student half the teacher's width."""
    data = tiny_recipe_dict(tiny_model_dir, tmp_path)
    data["student"] = {"config": {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 2,
                                  "num_attention_heads": 2, "num_key_value_heads": 1}}
    data["train"].update(train)
    data["train"]["baseline"] = False
    path = tmp_path / f"recipe-{len(list(tmp_path.glob('recipe-*')))}.yaml"
    path.write_text(yaml.safe_dump(data))
    return load_recipe(path)


def test_hidden_matching_with_projection_resumes_and_is_not_saved(cached, tmp_path, tiny_model_dir, monkeypatch):
    hidden = {"layers": [[1, 2], [2, 4]], "loss": "mse", "weight": 0.5}
    a = _narrow_student_recipe(tmp_path, tiny_model_dir, hidden=hidden)
    b = _narrow_student_recipe(tmp_path, tiny_model_dir, hidden=hidden)
    b.out = str(tmp_path / "out-b")
    pipeline.train(a)
    assert _train_killed_then_resumed(b, monkeypatch)["student"]["resumed_from"] == 4
    assert_same_weights(a.out_dir / "student", b.out_dir / "student")
    logs = log_lines(a.out_dir)
    assert all(line["hidden"] > 0 for line in logs)
    for line in logs:  # loss = alpha CE + (1 - alpha) T^2 KD + weight * hidden (alpha 0.5, T 1 by default)
        assert line["loss"] == pytest.approx(0.5 * line["ce"] + 0.5 * line["kd"] + 0.5 * line["hidden"], rel=1e-5)
    # The projection (16 -> 32) trained with the student but is not part of it.
    saved = student_tensors(a.out_dir / "student")
    assert not any(k.startswith("projections") for k in saved)
    plain = AutoModelForCausalLM.from_pretrained(a.out_dir / "student")
    assert set(plain.state_dict()) - {"lm_head.weight"} == set(saved) - {"lm_head.weight"}
    assert plain.config.hidden_size == 16


@pytest.mark.parametrize("kind", ["mse", "cosine"])
def test_hidden_loss_equals_float64_reference(tiny_model_dir, kind):
    teacher = sources.load_causal_lm(tiny_model_dir, device="cpu")
    torch.manual_seed(0)
    student = students.build_student(load_recipe_student(), teacher)
    pairs = [(1, 2), (2, 4)]
    objective = DistillationObjective(student, alpha=0.5, temperature=1.0, hidden_pairs=pairs, hidden_loss=kind,
                                      teacher_width=teacher.config.hidden_size)
    rows = [{"prompt_ids": [5, 6, 7, 8], "token_ids": [9, 10, 11]}, {"prompt_ids": [12, 13], "token_ids": [14, 3]}]
    batch = collate(rows, 0)
    teacher_forward(teacher, batch, top_k=4, hidden_layers=(2, 4))
    _, _, _, hid = objective(batch)

    with torch.no_grad():
        out = student.base_model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                                 output_hidden_states=True)
        expected = 0.0
        for proj, (s, _), target in zip(objective.projections, pairs, batch.teacher_hidden):
            h = out.hidden_states[s].flatten(0, 1)[batch.target_pos].double() @ proj.weight.double().T
            t = target.double()
            if kind == "mse":
                expected += ((h - t) ** 2).mean(-1).sum()
            else:
                expected += (1 - (h * t).sum(-1) / (h.norm(dim=-1) * t.norm(dim=-1))).sum()
        expected /= len(pairs)
    assert hid.item() == pytest.approx(expected.item(), rel=1e-5)
    hid.backward()
    assert objective.projections[0].weight.grad.abs().sum() > 0


def load_recipe_student():
    from distil.config.recipe import StudentConfig
    return StudentConfig(config={"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 2,
                                 "num_attention_heads": 2, "num_key_value_heads": 1})


def test_hidden_layer_out_of_range_is_a_clear_error(cached, tmp_path, tiny_model_dir):
    recipe = _narrow_student_recipe(tmp_path, tiny_model_dir, hidden={"layers": [[1, 2], [3, 4]]})
    with pytest.raises(DistilError) as err:
        pipeline.train(recipe)
    assert err.value.field == "train.hidden.layers.1" and "student" in str(err.value)


def test_recipe_validates_modes(load):
    assert load("train.mode=on_policy", "train.lambda=0.25").train.lambda_ == 0.25
    with pytest.raises(DistilError) as err:
        load("train.mode=gkd")
    assert err.value.field == "train.mode"
    with pytest.raises(DistilError) as err:
        load("train.lambda=1.5")
    assert err.value.field == "train.lambda"
    with pytest.raises(DistilError) as err:
        load("train.lamda=0.5")
    assert "did you mean 'lambda'" in str(err.value)
    with pytest.raises(DistilError) as err:
        load("train.hidden={layers: [[1, 2]], loss: l1}")
    assert err.value.field == "train.hidden.loss"
