"""docs/recipe.md is generated from the recipe schemas and kept in step with them."""

from __future__ import annotations

from pathlib import Path

from distil.config import reference

DOC = Path(__file__).resolve().parents[1] / "docs" / "recipe.md"


def test_docs_recipe_md_is_the_generated_reference():
    assert DOC.read_text(encoding="utf-8") == reference.markdown(), (
        f"docs/recipe.md is out of date with the recipe schemas; regenerate it: PYTHONPATH=src {reference.COMMAND}")


def test_the_reference_names_every_section_and_key():
    text = reference.markdown()
    for heading in ("### `train`", "### `student.lora`", "### `teachers[]`", "### `train.hidden`",
                    "## `task: classification`", "### `teacher.train`", "## `task: embedding`"):
        assert heading in text, heading
    for row in ("| `adam_betas` | [number (>= 0, < 1), number (>= 0, < 1)] | `[0.9, 0.95]` |",
                "| `skew` |", "| `lora_alpha` |", "| `baseline` | boolean | `true` |", "| `lambda` |",
                "| `out` | string | `runs/quickstart` |", "| `model` | string | required |"):
        assert row in text, row
    assert "| `source` |" not in text and "skew_alpha" not in text


def test_module_runs_as_a_script():
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "distil.config.reference"], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == reference.markdown()
