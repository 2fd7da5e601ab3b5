"""Tests for distil.recipe.load_recipe (validation, errors, overrides) and how the CLI reports them."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import RECIPE_BODY, run_cli

from distil.config.loading import apply_override, load_recipe
from distil.config.recipe import Recipe
from distil.errors import DistilError

BASE = "teacher:\n  model: some/teacher\n" + RECIPE_BODY
# BASE has 8 lines: a section appended after it starts on line 9, its first key on line 10.


def write(tmp_path: Path, text: str, name: str = "recipe.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def recipe_error(path: Path, overrides=()) -> DistilError:
    with pytest.raises(DistilError) as info:
        load_recipe(path, list(overrides))
    err = info.value
    assert "\n" not in str(err), "a DistilError must print as one line"
    return err


# --- a valid recipe ------------------------------------------------------------------------


def test_valid_recipe_defaults_and_relative_paths(tmp_path):
    path = write(tmp_path, BASE)
    recipe = load_recipe(path)
    assert isinstance(recipe, Recipe)
    assert recipe.source == str(path)
    assert recipe.student.from_teacher.layers == [0, 3]
    assert recipe.train.steps == 100 and recipe.generate.top_k == 32  # defaults
    # Data paths resolve against the recipe's folder, not the working directory.
    assert recipe.resolve(recipe.data.train) == tmp_path / "data" / "train.jsonl"
    assert recipe.resolve("/abs/x.jsonl") == Path("/abs/x.jsonl")


def test_tiny_recipe_fixture_loads(load, tiny_model_dir):
    recipe = load()
    assert recipe.teacher.model == str(tiny_model_dir)
    assert recipe.train.steps == 6 and recipe.generate.max_new_tokens == 6


# --- unknown keys ---------------------------------------------------------------------------


def test_unknown_key_names_path_line_and_suggestion(tmp_path):
    path = write(tmp_path, BASE + "train:\n  stesp: 5\n")
    err = recipe_error(path)
    assert err.field == "train.stesp"
    assert err.file == str(path) and err.line == 10
    assert "'steps'" in err.message
    text = str(err)
    assert text.startswith(f"{path}:10:") and "train.stesp" in text and "steps" in text


def test_unknown_top_level_key(tmp_path):
    path = write(tmp_path, BASE + "trian:\n  steps: 5\n")
    err = recipe_error(path)
    assert (err.field, err.line) == ("trian", 9)
    assert "'train'" in err.message


def test_unknown_nested_key_deep(tmp_path):
    text = BASE.replace("    layers: [0, 3]\n", "    layers: [0, 3]\n    intermediate_sise: 8\n")
    path = write(tmp_path, text)
    err = recipe_error(path)
    assert (err.field, err.line) == ("student.from_teacher.intermediate_sise", 6)
    assert "'intermediate_size'" in err.message


def test_unknown_key_without_close_match_lists_valid_keys(tmp_path):
    path = write(tmp_path, BASE + "eval:\n  zzzzzz: 1\n")
    err = recipe_error(path)
    assert err.field == "eval.zzzzzz"
    assert "speed_prompts" in err.message  # the valid keys are listed instead


# --- wrong types and ranges -------------------------------------------------------------------


@pytest.mark.parametrize("line, field", [
    ("train:\n  lr: -1\n", "train.lr"),
    ("train:\n  steps: ten\n", "train.steps"),
    ("train:\n  steps: 0\n", "train.steps"),
    ("train:\n  alpha: 1.5\n", "train.alpha"),
    ("generate:\n  top_p: 1.5\n", "generate.top_p"),
    ("train:\n  schedule: cosin\n", "train.schedule"),
    ("teacher_dtype_placeholder", "teacher.dtype"),
])
def test_wrong_type_or_range_names_field_and_line(tmp_path, line, field):
    if line == "teacher_dtype_placeholder":
        text = BASE.replace("  model: some/teacher\n", "  model: some/teacher\n  dtype: float8\n")
        expected_line = 3
    else:
        text = BASE + line
        expected_line = 10
    path = write(tmp_path, text)
    err = recipe_error(path)
    assert err.field == field
    assert err.file == str(path) and err.line == expected_line
    assert field in str(err) and f"{path}:{expected_line}:" in str(err)


def test_bad_list_item_names_index(tmp_path):
    path = write(tmp_path, BASE.replace("layers: [0, 3]", "layers: [0, x]"))
    err = recipe_error(path)
    assert err.field == "student.from_teacher.layers.1" and err.line == 5
    assert "'x'" in err.message


def test_missing_required_section(tmp_path):
    path = write(tmp_path, BASE.replace("data:\n  train: data/train.jsonl\n  eval: data/eval.jsonl\n", ""))
    err = recipe_error(path)
    assert err.field == "data" and "missing" in err.message


# --- YAML syntax and shape -------------------------------------------------------------------


def test_yaml_syntax_error_names_line(tmp_path):
    # Line 11 is indented less than its sibling on line 10: a syntax error there.
    path = write(tmp_path, BASE + "train:\n  steps: 5\n lr: 0.1\n")
    err = recipe_error(path)
    assert err.file == str(path)
    assert err.line == 11
    assert "YAML" in err.message


def test_yaml_unclosed_bracket(tmp_path):
    path = write(tmp_path, BASE + "train:\n  steps: [1\n")
    err = recipe_error(path)
    assert err.line is not None and err.line >= 10
    assert "YAML" in err.message


@pytest.mark.parametrize("text, message", [("", "empty"), ("- a\n- b\n", "mapping")])
def test_empty_or_not_a_mapping(tmp_path, text, message):
    err = recipe_error(write(tmp_path, text))
    assert message in err.message


def test_missing_recipe_file(tmp_path):
    err = recipe_error(tmp_path / "nope.yaml")
    assert err.file == str(tmp_path / "nope.yaml") and "not found" in err.message


# --- overrides --------------------------------------------------------------------------------


def test_overrides_apply_and_convert_types(tmp_path):
    path = write(tmp_path, BASE + "train:\n  steps: 5\n")
    recipe = load_recipe(path, ["train.steps=50", "out=/tmp/x", "train.lr=0.01", "train.baseline=false",
                                "train.max_grad_norm=null", "student.from_teacher.layers=[1, 2]",
                                "generate.top_k=4"])
    assert recipe.train.steps == 50 and isinstance(recipe.train.steps, int)
    assert recipe.out == "/tmp/x" and recipe.out_dir == Path("/tmp/x")
    assert recipe.train.lr == pytest.approx(0.01) and isinstance(recipe.train.lr, float)
    assert recipe.train.baseline is False
    assert recipe.train.max_grad_norm is None
    assert recipe.student.from_teacher.layers == [1, 2]
    assert recipe.generate.top_k == 4


def test_override_creates_missing_section(tmp_path):
    recipe = load_recipe(write(tmp_path, BASE), ["generate.batch_size=3"])
    assert recipe.generate.batch_size == 3


def test_overrides_apply_in_order(tmp_path):
    recipe = load_recipe(write(tmp_path, BASE), ["train.steps=3", "train.steps=7"])
    assert recipe.train.steps == 7


@pytest.mark.parametrize("override, field, suggestion", [
    ("train.stesp=50", "train.stesp", "'steps'"),
    ("trian.steps=50", "trian", "'train'"),
    ("outt=/tmp/x", "outt", "'out'"),
])
def test_unknown_override_key_errors_naming_it(tmp_path, override, field, suggestion):
    err = recipe_error(write(tmp_path, BASE), [override])
    assert err.field == field
    assert err.file == "command line" and err.line is None
    assert suggestion in err.message


def test_override_bad_value_blames_command_line(tmp_path):
    err = recipe_error(write(tmp_path, BASE), ["train.steps=ten"])
    assert err.field == "train.steps" and err.file == "command line"


def test_override_without_equals(tmp_path):
    err = recipe_error(write(tmp_path, BASE), ["train.steps"])
    assert "key.sub=value" in err.message


def test_apply_override_parses_yaml_values():
    data: dict = {}
    apply_override(data, "train.lr=0.5")
    apply_override(data, "train.baseline=no")
    apply_override(data, "out=runs/a=b")  # only the first '=' splits
    assert data == {"train": {"lr": 0.5, "baseline": False}, "out": "runs/a=b"}


# --- student source ---------------------------------------------------------------------------


STUDENT_FROM_TEACHER = "  from_teacher:\n    layers: [0, 3]\n"


@pytest.mark.parametrize("student, got", [
    ("  model: a/b\n" + STUDENT_FROM_TEACHER, "from_teacher"),
    ("  model: a/b\n  config:\n    hidden_size: 8\n", "config"),
    ("  dtype: float32\n", "none"),
])
def test_student_needs_exactly_one_source(tmp_path, student, got):
    path = write(tmp_path, BASE.replace(STUDENT_FROM_TEACHER, student))
    err = recipe_error(path)
    assert err.field == "student" and err.line == 3
    assert "exactly one" in err.message and got in err.message


@pytest.mark.parametrize("student", ["  model: a/b\n", "  config:\n    hidden_size: 8\n", STUDENT_FROM_TEACHER])
def test_student_one_source_is_fine(tmp_path, student):
    load_recipe(write(tmp_path, BASE.replace(STUDENT_FROM_TEACHER, student)))


def test_override_can_switch_student_source_only_cleanly(tmp_path):
    # Adding a second source from the command line is an error too.
    err = recipe_error(write(tmp_path, BASE), ["student.model=a/b"])
    assert err.field == "student" and "exactly one" in err.message


# --- the CLI ------------------------------------------------------------------------------------


@pytest.fixture
def bad_key_recipe(tmp_path) -> Path:
    return write(tmp_path, BASE + "train:\n  stesp: 5\n", name="bad.yaml")


def test_cli_bad_key_one_line_no_traceback(bad_key_recipe):
    proc = run_cli("train", str(bad_key_recipe))
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    assert f"{bad_key_recipe}:10" in lines[0]
    assert "train.stesp" in lines[0] and "steps" in lines[0]


def test_cli_debug_shows_traceback(bad_key_recipe):
    proc = run_cli("--debug", "train", str(bad_key_recipe))
    assert proc.returncode != 0
    assert "Traceback" in proc.stderr
    assert "train.stesp" in proc.stderr


def test_every_shipped_recipe_loads():
    from distil.paths import shipped

    recipes = sorted(shipped("recipes").glob("*.yaml"))
    assert len(recipes) >= 7
    for path in recipes:
        recipe = load_recipe(path)
        assert recipe.out_dir.name, path  # every recipe names where its run goes
    draft = load_recipe(shipped("recipes/draft.yaml"))
    assert draft.student.from_teacher.layers == [0, 4, 8, 12, 16, 20, 24, 29] and draft.train.loss == "tvd"


# --- renamed keys and keys that do not go together -------------------------------------------


@pytest.mark.parametrize("section, old, new", [
    ("train:\n  skew_alpha: 0.2\n", "train.skew_alpha", "train.skew"),
    ("eval:\n  baseline: false\n", "eval.baseline", "train.baseline"),
])
def test_an_old_key_name_names_the_new_one(tmp_path, section, old, new):
    path = write(tmp_path, BASE + section)
    err = recipe_error(path)
    assert err.field == old and err.file == str(path) and err.line == 10
    assert f"{old} was renamed to {new}" in str(err)


def test_old_lora_alpha_names_lora_alpha(tmp_path):
    path = write(tmp_path, BASE.replace("  from_teacher:\n", "  lora: {r: 4, alpha: 8}\n  from_teacher:\n"))
    err = recipe_error(path)
    assert err.field == "student.lora.alpha" and "renamed to student.lora.lora_alpha" in err.message
    assert load_recipe(write(tmp_path, BASE.replace("  from_teacher:\n", "  lora: {r: 4, lora_alpha: 8}\n"
                                                                          "  from_teacher:\n"))).student.lora.lora_alpha == 8


@pytest.mark.parametrize("override, old, new", [("train.skew_alpha=0.2", "train.skew_alpha", "train.skew"),
                                                ("eval.baseline=false", "eval.baseline", "train.baseline")])
def test_an_old_key_name_in_an_override_names_the_new_one(tmp_path, override, old, new):
    err = recipe_error(write(tmp_path, BASE), [override])
    assert err.file == "command line" and err.field == old and f"{old} was renamed to {new}" in err.message


def test_renamed_keys_load_under_their_new_names(tmp_path):
    recipe = load_recipe(write(tmp_path, BASE), ["train.skew=0.3", "train.baseline=false", "train.adam_betas=[0.8, 0.99]"])
    assert recipe.train.skew == 0.3 and recipe.train.baseline is False and recipe.train.adam_betas == (0.8, 0.99)
    assert load_recipe(write(tmp_path, BASE)).train.adam_betas == (0.9, 0.95)


def test_adam_betas_must_be_two_numbers_below_one(tmp_path):
    assert recipe_error(write(tmp_path, BASE), ["train.adam_betas=[0.9, 1.0]"]).field == "train.adam_betas.1"
    assert recipe_error(write(tmp_path, BASE), ["train.adam_betas=[0.9]"]).field.startswith("train.adam_betas")


def test_alpha_with_sequence_mode_is_an_error(tmp_path):
    path = write(tmp_path, BASE + "train:\n  mode: sequence\n  alpha: 0.3\n")
    err = recipe_error(path)
    assert err.field == "train.alpha" and err.line == 11
    assert "cross-entropy only" in err.message and "ignores alpha" in err.message
    err = recipe_error(write(tmp_path, BASE + "train:\n  alpha: 0.3\n"), ["train.mode=sequence"])
    assert err.field == "train.alpha"
    assert load_recipe(write(tmp_path, BASE), ["train.mode=sequence"]).train.mode == "sequence"  # alpha unset: fine


def test_out_resolves_against_the_working_directory_and_data_against_the_recipe(tmp_path):
    from distil.config.recipe import DataConfig

    recipe = load_recipe(write(tmp_path, BASE + "out: runs/x\n"))
    assert recipe.out_dir == Path("runs/x")  # relative to the working directory
    assert "working directory" in Recipe.model_fields["out"].description
    for name in ("train", "eval"):
        assert "recipe file" in DataConfig.model_fields[name].description


def test_every_recipe_field_has_a_description():
    from pydantic import BaseModel

    from distil.config import recipe as recipe_module
    from distil.config import tasks

    missing = [f"{model.__name__}.{name}" for module in (recipe_module, tasks) for model in vars(module).values()
               if isinstance(model, type) and issubclass(model, BaseModel) and model.__module__ == module.__name__
               for name, field in model.model_fields.items() if not field.description]
    assert missing == []
