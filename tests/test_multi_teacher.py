"""Several teachers (`teachers:`): routing by a data field, ensembles, and explanation tuning
(`generate.explain`), on tiny models."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from conftest import (
    PROMPT_WORDS,
    RECIPE_BODY,
    build_tiny_llama,
    build_tokenizer,
    run_cli,
    tiny_recipe_dict,
    write_jsonl,
)

from distil import pipeline
from distil.config.loading import load_recipe
from distil.data.splits import load_data
from distil.errors import DistilError
from distil.generation.cache import TeacherCache
from distil.generation.decoding import topk_with_tail
from distil.generation.explain import final_answer, teacher_chat
from distil.generation.stage import teacher_view
from distil.generation.teachers.many import Teachers, mix_log_probs
from distil.generation.view import TeacherPrompts, generation_settings

CATEGORIES = ["science", "food", "chat"]


@pytest.fixture(scope="session")
def second_model_dir(tmp_path_factory):
    """Another tiny teacher (other weights, the same tokenizer)."""
    folder = tmp_path_factory.mktemp("tiny-llama-b") / "tiny-llama-b"
    tokenizer = build_tokenizer()
    model = build_tiny_llama(len(tokenizer), tokenizer.eos_token_id, tokenizer.pad_token_id, seed=1)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def _prompt(i: int) -> str:
    return " ".join(PROMPT_WORDS[(i * 11 + j * 3) % len(PROMPT_WORDS)] for j in range(3 + i % 5)) + "?"


@pytest.fixture
def categorized(tmp_path):
    """train.jsonl (18 rows) and eval.jsonl (6 rows), every row with a category."""
    data = tmp_path / "data"
    data.mkdir()
    write_jsonl(data / "train.jsonl", [{"prompt": _prompt(i), "category": CATEGORIES[i % 3]} for i in range(18)])
    write_jsonl(data / "eval.jsonl", [{"prompt": _prompt(100 + i), "category": CATEGORIES[i % 3],
                                       "reference": " ".join(PROMPT_WORDS[i:i + 3])} for i in range(6)])
    return data


def exact_cache(data: dict) -> dict:
    """These tests check the mixtures' arithmetic to 1e-5: the cache keeps float32 soft targets."""
    data.setdefault("generate", {})["cache_format"] = "float32"
    return data


def multi_recipe(tmp_path, first, second, mode="route", name="multi.yaml", **extra) -> str:
    data = exact_cache(tiny_recipe_dict(first, tmp_path))
    del data["teacher"]
    if mode == "route":
        data["teachers"] = [{"name": "a", "model": str(first), "when": {"category": ["science", "food"]}},
                            {"name": "b", "model": str(second)}]
    else:
        data["teachers_mode"] = "ensemble"
        data["teachers"] = [{"name": "a", "model": str(first), "weight": 3},
                            {"name": "b", "model": str(second), "weight": 1}]
    data.update(extra)
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return str(path)


def single_recipe(tmp_path, model, name: str, cache: str) -> str:
    data = exact_cache(tiny_recipe_dict(model, tmp_path))
    data["cache"] = str(tmp_path / cache)
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return str(path)


def cache_rows(cache_dir) -> list[dict]:
    return list(TeacherCache(cache_dir).read().values())


# --- routing -----------------------------------------------------------------------------------


def test_route_gives_every_row_to_its_teacher_once_in_one_cache(tmp_path, tiny_model_dir, second_model_dir,
                                                                 categorized, distil_home):
    recipe = load_recipe(multi_recipe(tmp_path, tiny_model_dir, second_model_dir))
    train_ex, eval_ex = load_data(recipe)
    examples = train_ex + eval_ex
    summary = pipeline.generate(recipe)
    assert summary["generated"] == summary["rows"] == 24
    assert summary["teachers"]["a"]["rows"] == 16 and summary["teachers"]["b"]["rows"] == 8

    rows = cache_rows(recipe.cache_dir)
    assert len(rows) == 24 and len({r["key"] for r in rows}) == 24  # each row exactly once, in one cache
    by_key = {r["key"]: r for r in rows}
    view = teacher_view(recipe)
    for ex, key in zip(examples, view.keys(examples)):
        assert by_key[key]["teacher"] == ("a" if ex.category in ("science", "food") else "b")

    # Each teacher's rows are what a recipe with only that teacher writes, under the same keys.
    for model, name, wanted in ((tiny_model_dir, "a", {"science", "food"}), (second_model_dir, "b", {"chat"})):
        alone = load_recipe(single_recipe(tmp_path, model, f"{name}.yaml", f"cache-{name}"))
        pipeline.generate(alone)
        own = {r["key"]: r for r in cache_rows(alone.cache_dir)}
        share = [ex for ex in examples if ex.category in wanted]
        for key in TeacherPrompts(alone).keys(share):
            assert by_key[key]["token_ids"] == own[key]["token_ids"]
            assert by_key[key]["topk_ids"] == own[key]["topk_ids"]  # (other batches: float noise in the values)
            assert torch.allclose(torch.tensor(by_key[key]["topk_logprobs"]), torch.tensor(own[key]["topk_logprobs"]),
                                  atol=1e-5)

    again = pipeline.generate(recipe)
    assert again["generated"] == 0 and again["cached_before"] == 24
    assert len(cache_rows(recipe.cache_dir)) == 24


def test_a_row_no_teacher_takes_is_an_error_naming_its_line(tmp_path, tiny_model_dir, second_model_dir,
                                                            categorized, distil_home):
    path = multi_recipe(tmp_path, tiny_model_dir, second_model_dir)
    data = yaml.safe_load(open(path))
    data["teachers"][1]["when"] = {"category": "science"}
    open(path, "w").write(yaml.safe_dump(data))
    with pytest.raises(DistilError) as info:
        pipeline.generate(load_recipe(path))
    err = info.value
    assert err.file == str(categorized / "train.jsonl") and err.line == 3  # the first "chat" row
    assert err.field == "teachers" and "category='chat'" in err.message


def test_wider_rows_are_cut_to_the_narrowest_keeping_their_mass():
    torch.manual_seed(0)
    log_probs = torch.randn(3, 40).log_softmax(-1)
    ids, values, tail = topk_with_tail(log_probs, 6)
    order = torch.tensor([[5, 0, 3, 1, 4, 2]] * 3)  # an endpoint need not list its alternatives in order
    wide = {"teacher": "x", "token_ids": [1, 2, 3], "topk_ids": ids.gather(-1, order).tolist(),
            "topk_logprobs": values.gather(-1, order).tolist(), "tail_logprob": tail.tolist()}
    narrow = {"teacher": "y", "token_ids": [5], "topk_ids": [[5, 6, 7, 8]], "topk_logprobs": [[-0.2, -2.5, -3.0, -4.0]],
              "tail_logprob": [-2.2]}

    class View:  # Teachers.student_rows without models: only the cut and the explain pass-through
        width = 4
        views = [type("Single", (), {"student_rows": staticmethod(lambda rows, examples: rows)})()]

    cut, same = Teachers.student_rows(View(), [wide, narrow], [None, None])
    assert same is narrow
    # Exactly what the teacher would have given with top-4: same ids, same log-probs, the exact tail.
    ref_ids, ref_values, ref_tail = topk_with_tail(log_probs, 4)
    assert cut["topk_ids"] == ref_ids.tolist()
    assert torch.allclose(torch.tensor(cut["topk_logprobs"]), ref_values, atol=1e-6)
    assert torch.allclose(torch.tensor(cut["tail_logprob"]), ref_tail, atol=1e-5)


# --- ensembles ---------------------------------------------------------------------------------


def test_mixture_matches_a_float64_reference_and_keeps_all_mass():
    torch.manual_seed(0)
    logits = [torch.randn(5, 50) * 3 for _ in range(3)]
    weights = [0.5, 0.3, 0.2]
    mixed = mix_log_probs([z.log_softmax(-1) for z in logits], weights)
    ids, values, tail = topk_with_tail(mixed, 8)

    reference = sum(w * z.double().softmax(-1) for w, z in zip(weights, logits))
    ref_values, ref_ids = reference.topk(8, dim=-1)
    assert torch.equal(ids, ref_ids)
    assert torch.allclose(values.double().exp(), ref_values, atol=1e-6)
    assert torch.allclose(tail.double().exp(), 1 - ref_values.sum(-1), atol=1e-6)
    mass = values.double().exp().sum(-1) + tail.double().exp()
    assert torch.allclose(mass, torch.ones(5, dtype=torch.float64), atol=1e-6)


def test_ensemble_rows_average_both_teachers_on_the_first_ones_text(tmp_path, tiny_model_dir, second_model_dir,
                                                                    categorized, distil_home):
    from distil.data.batches import collate
    from distil.models.sources import load_causal_lm

    recipe = load_recipe(multi_recipe(tmp_path, tiny_model_dir, second_model_dir, mode="ensemble"))
    train_ex, eval_ex = load_data(recipe)
    examples = train_ex + eval_ex
    summary = pipeline.generate(recipe)
    assert summary["teachers"]["a"]["generated"] == 24 and summary["teachers"]["b"] == {"rows": 0, "scores_every_row": True}
    assert summary["ensemble"]["scored"] == 24

    rows = {r["key"]: r for r in cache_rows(recipe.cache_dir)}
    assert len(rows) == 48  # the first teacher's own rows, and the ensemble's
    view = teacher_view(recipe)
    writer = TeacherPrompts(recipe.member(0))
    teachers = [load_causal_lm(d, device="cpu") for d in (tiny_model_dir, second_model_dir)]
    for key, wkey in zip(view.keys(examples), writer.keys(examples)):
        row, written = rows[key], rows[wkey]
        assert row["teacher"] == "a+b" and row["text"] == written["text"] and row["token_ids"] == written["token_ids"]
        # Reference: both teachers' float64 distributions on that text, mixed 3:1.
        batch = collate([written], pad_id=0)
        with torch.no_grad():
            probs = [torch.softmax(m(input_ids=batch.input_ids).logits[0].double(), -1)[batch.target_pos] for m in teachers]
        mixture = 0.75 * probs[0] + 0.25 * probs[1]
        top, top_ids = mixture.topk(8, dim=-1)
        assert torch.equal(torch.tensor(row["topk_ids"]), top_ids)
        assert torch.allclose(torch.tensor(row["topk_logprobs"]).double().exp(), top, atol=1e-5)
        assert torch.allclose(torch.tensor(row["tail_logprob"]).double().exp(), 1 - top.sum(-1), atol=1e-5)
        chosen = mixture.gather(-1, torch.tensor(row["token_ids"])[:, None]).squeeze(-1)
        assert torch.allclose(torch.tensor(row["token_logprobs"]).double().exp(), chosen, atol=1e-5)

    again = pipeline.generate(recipe)
    assert again["generated"] == 0 and again["ensemble"]["scored"] == 0
    # Another weight is another ensemble: new rows, the first teacher's text re-used.
    other = load_recipe(multi_recipe(tmp_path, tiny_model_dir, second_model_dir, mode="ensemble", name="e2.yaml"),
                        ["teachers.1.weight=3"])
    third = pipeline.generate(other)
    assert third["generated"] == 0 and third["ensemble"]["scored"] == 24


# --- the recipe --------------------------------------------------------------------------------

BASE = RECIPE_BODY  # student and data; the teachers come first
TWO = """\
teachers:
  - name: a
    model: some/a
    when: {category: coding}
  - name: b
    model: some/b
"""


@pytest.mark.parametrize("text, field, line, words", [
    (TWO + "teacher:\n  model: some/c\n", "teachers", 1, "not both"),
    (TWO.replace("    when: {category: coding}\n", ""), "teachers.0.when", 2, "only the last teacher"),
    (TWO + "teachers_mode: ensemble\n", "teachers.0.when", 4, "route"),
    (TWO.replace("    model: some/b\n", "    model: some/b\n    weight: 2\n"), "teachers.1.weight", 7, "ensemble"),
    (TWO.replace("name: b", "name: a"), "teachers.1.name", 5, "twice"),
    (TWO.replace("    model: some/b\n", "    model: some/b\n    type: openai\n    base_url: http://127.0.0.1:1/v1\n")
     + "teachers_mode: ensemble\n", "teachers.0.when", 4, "route"),
    (TWO.replace("    when: {category: coding}\n", "").replace("    model: some/b\n",
     "    model: some/b\n    type: openai\n    base_url: http://127.0.0.1:1/v1\n") + "teachers_mode: ensemble\n",
     "teachers.1.type", 6, "local teachers"),
    (TWO.replace("category: coding", "topic: coding"), "teachers.0.when.topic", 4, "category"),
    (TWO.replace("    model: some/b\n", "    modle: some/b\n"), "teachers.1.modle", 6, "'model'"),
    ("teachers_mode: route\n", "teacher", None, "missing"),
    ("teacher:\n  model: some/c\nteachers_mode: ensemble\n", "teachers_mode", 3, "only applies"),
    ("teachers:\n  - name: a\n    model: some/a\n", "teachers", 1, "at least 2"),
])
def test_recipe_errors_name_the_key_and_line(tmp_path, text, field, line, words):
    path = tmp_path / "r.yaml"
    path.write_text(text + BASE)
    with pytest.raises(DistilError) as info:
        load_recipe(path)
    err = info.value
    assert (err.field, err.line) == (field, line), str(err)
    assert words in err.message and err.file == str(path)


def test_a_member_is_a_plain_teacher_section(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(TWO.replace("    model: some/b\n", "    model: some/b\n    dtype: bfloat16\n") + BASE)
    recipe = load_recipe(path)
    assert recipe.teacher is None and recipe.teachers_mode == "route"
    member = recipe.member(1)
    assert member.teachers is None and member.teacher.model == "some/b" and member.teacher.dtype == "bfloat16"
    assert recipe.member(0).teacher.model_fields_set == {"model"}
    # A lower-precision teacher writes other text: its rows are keyed apart; float32 keys are unchanged.
    f32 = generation_settings(recipe.member(0))
    assert "dtype" not in f32 and generation_settings(member) == {**f32, "dtype": "bfloat16"}


# --- explanation tuning ------------------------------------------------------------------------


def test_explain_asks_the_teacher_and_trains_the_student_on_the_plain_prompt(load, tiny_model_dir):
    plain, explained = load(), load("generate.explain=true", "data.system_prompt=be brief")
    train_ex, _ = load_data(plain)
    view, eview = TeacherPrompts(plain), TeacherPrompts(explained)
    asked = eview.prompts(train_ex)
    assert all(explained.generate.explain_prompt in p and "be brief" in p for p in asked)
    assert not any(explained.generate.explain_prompt in p for p in view.prompts(train_ex))
    assert set(view.keys(train_ex)).isdisjoint(eview.keys(train_ex))

    pipeline.generate(explained)
    cached = TeacherCache(explained.cache_dir).read()
    rows = [cached[k] for k in eview.keys(train_ex)]
    assert rows[0]["prompt"] == asked[0]  # the cache keeps what the teacher saw
    student = eview.student_rows(rows, train_ex)
    plain_prompts = [p.replace("\n\n" + explained.generate.explain_prompt, "") for p in asked]
    for row, srow, prompt in zip(rows, student, plain_prompts):
        assert srow["prompt"] == prompt and srow["token_ids"] == row["token_ids"]
        assert srow["prompt_ids"] == view.tokenizer(prompt, add_special_tokens=False)["input_ids"]
        assert len(srow["prompt_ids"]) < len(row["prompt_ids"])


def test_explain_instruction_joins_the_chats_own_system_message(load):
    recipe = load("generate.explain=true", "data.system_prompt=ignored when the chat has one")
    chat, system = teacher_chat([{"role": "system", "content": "You are kind."}, {"role": "user", "content": "hi"}],
                                recipe)
    assert system is None and chat[0]["content"] == "You are kind.\n\n" + recipe.generate.explain_prompt
    chat, system = teacher_chat([{"role": "user", "content": "hi"}], load())
    assert system is None and chat == [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize("text, answer", [
    ("Rain falls from clouds.\nAnswer: water", "water"),
    ("step 1\nanswer - 42\nFinal answer: 43 ", "43"),
    ("no final line here", None),
])
def test_final_answer(text, answer):
    assert final_answer(text) == answer


# --- end to end --------------------------------------------------------------------------------


@pytest.mark.slow
def test_distil_run_with_a_local_and_an_endpoint_teacher(tmp_path, tiny_model_dir, categorized, distil_home):
    from endpoints import ServeProcess

    server = ServeProcess(tiny_model_dir)
    try:
        path = multi_recipe(tmp_path, tiny_model_dir, tiny_model_dir, eval={"speed_prompts": 1},
                            train={**tiny_recipe_dict(tiny_model_dir, tmp_path)["train"], "baseline": False})
        data = yaml.safe_load(open(path))
        data["teachers"][1] = {"name": "endpoint", "type": "openai", "base_url": server.url, "model": "tiny-llama",
                               "local_model": str(tiny_model_dir), "top_logprobs": 5}
        data["generate"]["explain"] = True
        open(path, "w").write(yaml.safe_dump(data))
        proc = run_cli("run", path, env_extra={"DISTIL_HOME": str(distil_home)})
    finally:
        server.stop()
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    section = report["teachers"]
    assert section["mode"] == "route"
    counts = {t["name"]: (t["train_rows"], t["held_out_rows"]) for t in section["teachers"]}
    assert counts == {"a": (12, 4), "endpoint": (6, 2)}
    assert section["held_out_rows_by_recorded_teacher"] == {"a": 4, "endpoint": 2}
    assert all(0 <= t["student_top1_agreement"] <= 1 for t in section["teachers"])
    assert report["teacher_usage"]["requests"] >= 8  # only the endpoint's share went over HTTP
    assert {"answer_f1", "answer_found"} <= set(report["metrics"])
    html = (tmp_path / "out" / "report.html").read_text()
    assert "Teachers (route)" in html and "endpoint" in html
