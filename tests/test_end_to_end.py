"""`distil run` end to end on the tiny teacher, and a bad data file caught before any model loads."""

from __future__ import annotations

import json
import time

import pytest
from conftest import assert_valid_report, run_cli

from distil import pipeline
from distil.data.splits import load_data
from distil.errors import DistilError
from distil.generation.view import TeacherPrompts
from distil.models import sources, students

MODELS = ("teacher", "student", "baseline")


@pytest.mark.slow
def test_distil_run_writes_the_report(recipe_path, tmp_path, distil_home):
    proc = run_cli("run", str(recipe_path), env_extra={"DISTIL_HOME": str(distil_home)})
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "Traceback" not in proc.stderr
    out = tmp_path / "out"
    assert str(out / "report.html") in proc.stdout

    report = json.loads((out / "report.json").read_text())
    assert_valid_report(report)
    assert report["task"] == "causal_lm"
    models = report["models"]
    for name in MODELS:
        block = models[name]
        assert isinstance(block["params"], int) and block["params"] > 0, name
        assert block["size_bytes"] > 0, name
        assert block["speed"]["value"] > 0 and block["speed"]["unit"] == "tokens/s", name
        assert block["latency_s"] > 0 and block["peak_memory_bytes"] > 0, name
    assert models["teacher"]["params"] > models["student"]["params"] == models["baseline"]["params"]
    assert report["compression"] == pytest.approx(models["teacher"]["params"] / models["student"]["params"])
    assert report["speedup"] == pytest.approx(models["student"]["speed"]["value"] / models["teacher"]["speed"]["value"])
    assert report["compression"] > 1
    assert report["eval_rows"] == 8

    metrics = report["metrics"]
    assert {"top1_agreement", "teacher_kl", "perplexity", "token_f1"} <= set(metrics)
    for name, entry in metrics.items():
        for model in MODELS:
            assert isinstance(entry[model], (int, float)), (name, model)
        assert isinstance(entry["higher_is_better"], bool)
        assert "retention" in entry
        if entry["retention"] is not None:
            assert entry["retention"] >= 0
    # The teacher agrees with itself and is at zero KL from itself.
    assert metrics["top1_agreement"]["teacher"] == 1.0 and metrics["teacher_kl"]["teacher"] == 0.0
    assert metrics["top1_agreement"]["retention"] == pytest.approx(metrics["top1_agreement"]["student"])
    assert metrics["perplexity"]["higher_is_better"] is False
    assert metrics["perplexity"]["retention"] == pytest.approx(
        metrics["perplexity"]["teacher"] / metrics["perplexity"]["student"])
    assert set(report["per_category"]) == {"science", "food", "chat"}

    html = (out / "report.html").read_text()
    assert html.lstrip().lower().startswith("<!doctype html") and "</html>" in html
    assert (out / "student" / "config.json").exists() and (out / "baseline" / "config.json").exists()
    assert len((out / "eval_answers.jsonl").read_text().splitlines()) == 8

    # Gates for CI: a failed one exits 3 with one line naming it; the passing one says nothing.
    gated = run_cli("eval", str(recipe_path), "--gate", "compression > 1", "--gate", "top1_agreement.retention >= 1.01",
                    env_extra={"DISTIL_HOME": str(distil_home)})
    assert gated.returncode == 3, gated.stderr[-4000:]
    failed = [line for line in gated.stderr.splitlines() if line.startswith("gate failed:")]
    assert len(failed) == 1 and failed[0].startswith("gate failed: top1_agreement.retention >= 1.01 (actual: ")
    assert "Traceback" not in gated.stderr
    gates = json.loads((out / "report.json").read_text())["gates"]
    assert [g["passed"] for g in gates] == [True, False]
    assert run_cli("eval", str(recipe_path), "--gate", "compression > 1",
                   env_extra={"DISTIL_HOME": str(distil_home)}).returncode == 0

    # Running again does no work twice: nothing is generated and training is skipped.
    from distil.config.loading import load_recipe
    from distil.generation.cache import TeacherCache

    recipe = load_recipe(recipe_path)
    shards = TeacherCache(recipe.cache_dir).shards()
    assert pipeline.generate(recipe)["generated"] == 0
    trained = pipeline.train(recipe, resume=True)
    assert trained["student"]["skipped"] and trained["baseline"]["skipped"]
    assert TeacherCache(recipe.cache_dir).shards() == shards


@pytest.fixture
def bad_prompts_recipe(recipe_path, prompts_files):
    train, _ = prompts_files
    lines = train.read_text().splitlines()
    lines[2] = '{"prompt": "unterminated'  # line 3
    train.write_text("\n".join(lines) + "\n")
    return recipe_path


def test_bad_prompts_file_fails_fast_before_any_model_loads(bad_prompts_recipe, prompts_files, tmp_path, distil_home):
    train, _ = prompts_files
    t0 = time.time()
    proc = run_cli("run", str(bad_prompts_recipe), env_extra={"DISTIL_HOME": str(distil_home)})
    elapsed = time.time() - t0
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    assert f"{train}:3" in lines[0]
    assert elapsed < 60, f"took {elapsed:.1f}s"  # process start and imports only; nothing is loaded
    assert not (tmp_path / "out").exists(), "no out dir (and no student) may be created"
    assert not (tmp_path / "cache").exists()


def test_bad_prompts_file_checked_before_models_in_process(bad_prompts_recipe, prompts_files, tmp_path, monkeypatch):
    train, _ = prompts_files

    def forbidden(*args, **kwargs):
        raise AssertionError("a model or tokenizer was loaded before the data was checked")

    for module, name in ((sources, "resolve"), (sources, "load_tokenizer"), (sources, "load_causal_lm"),
                         (students, "build_student")):
        monkeypatch.setattr(module, name, forbidden)
    from distil.config.loading import load_recipe

    with pytest.raises(DistilError) as info:
        pipeline.run(load_recipe(bad_prompts_recipe))
    assert info.value.file == str(train) and info.value.line == 3
    assert not (tmp_path / "out").exists()


# --- evaluation in process (speed timed in process too, to keep the suite fast) ----------------------


def trained(load, *overrides):
    recipe = load(*overrides)
    pipeline.generate(recipe)
    pipeline.train(recipe)
    return recipe


def test_evaluate_metrics_match_an_independent_computation(load, in_process_speed):
    import torch

    from distil.generation.cache import TeacherCache

    recipe = trained(load, "train.baseline=false")
    report = pipeline.evaluate(recipe)
    assert_valid_report(report)
    assert "baseline" not in report["models"]
    assert set(report["metrics"]["top1_agreement"]) >= {"teacher", "student"}
    assert (recipe.out_dir / "report.html").exists()

    view = TeacherPrompts(recipe)
    _, eval_ex = load_data(recipe)
    rows_by_key = TeacherCache(recipe.cache_dir).read()
    rows = [rows_by_key[k] for k in view.keys(eval_ex)]
    student = sources.load_causal_lm(recipe.out_dir / "student", device="cpu")
    agree = kl = nll = n = 0.0
    teacher_nll = 0.0
    for row in rows:
        ids = torch.tensor([row["prompt_ids"] + row["token_ids"]])
        with torch.no_grad():
            logp = torch.log_softmax(student(input_ids=ids).logits[0].double(), -1)
        start = len(row["prompt_ids"]) - 1
        for j, tok in enumerate(row["token_ids"]):
            lp = logp[start + j]
            agree += float(int(lp.argmax()) == row["topk_ids"][j][0])
            top = torch.tensor(row["topk_logprobs"][j], dtype=torch.float64)
            p_t = torch.cat([top, torch.tensor([row["tail_logprob"][j]], dtype=torch.float64)]).exp()
            picked = lp[torch.tensor(row["topk_ids"][j])]
            log_s = torch.cat([picked, torch.log1p(-picked.exp().sum())[None]])
            kl += float((p_t * (p_t.log() - log_s)).sum())
            nll -= float(lp[tok])
            teacher_nll -= row["token_logprobs"][j]
            n += 1
    metrics = report["metrics"]
    assert metrics["top1_agreement"]["student"] == pytest.approx(agree / n, abs=1e-9)
    assert metrics["teacher_kl"]["student"] == pytest.approx(kl / n, abs=1e-4)
    assert metrics["perplexity"]["student"] == pytest.approx(torch.exp(torch.tensor(nll / n)).item(), rel=1e-4)
    assert metrics["perplexity"]["teacher"] == pytest.approx(torch.exp(torch.tensor(teacher_nll / n)).item(), rel=1e-4)


def test_eval_max_new_tokens_limits_answers(load, in_process_speed):
    recipe = trained(load, "train.baseline=false", "eval.max_new_tokens=2")
    pipeline.evaluate(recipe)
    answers = [json.loads(line) for line in (recipe.out_dir / "eval_answers.jsonl").read_text().splitlines()]
    # The tiny tokenizer decodes one word per token.
    assert max(len(a["student"].split()) for a in answers) <= 2
