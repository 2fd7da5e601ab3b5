"""Bad input: every case exits non-zero with one error line naming the file and the line or field,
no traceback, and nothing half-written in the output directory or the cache.

Each case runs the real entry point (`distil.cli.main`) in-process, so the whole table takes
seconds; `test_bad_input_in_a_real_process` checks a few in fresh processes too.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from conftest import build_tiny_llama, run_cli, tiny_recipe_dict

from distil import cli


def _recipe(tmp_path: Path, model_dir: Path, **changes) -> dict:
    data = tiny_recipe_dict(model_dir, tmp_path)
    for dotted, value in changes.items():
        node = data
        *parents, last = dotted.split("__")
        for key in parents:
            node = node.setdefault(key, {})
        node[last] = value
    return data


def _write_recipe(tmp_path: Path, data: dict) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def _with_train_file(tmp_path, model_dir, name: str, content: bytes | str):
    """A recipe whose data.train is `name` with `content`; returns (argv, file)."""
    file = tmp_path / "data" / name
    file.parent.mkdir(exist_ok=True)
    if isinstance(content, str):
        content = content.encode("utf-8")
    file.write_bytes(content)
    return ["generate", str(_write_recipe(tmp_path, _recipe(tmp_path, model_dir, data__train=f"data/{name}")))], name


def _recipe_text(tmp_path, text: str | bytes):
    path = tmp_path / "recipe.yaml"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return ["generate", str(path)], "recipe.yaml"


def _other_tokenizer_student(tmp_path: Path) -> Path:
    """A small model folder whose tokenizer is not the teacher's."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "<unk>", "<|im_start|>", "<|im_end|>"] + [f"w{i}" for i in range(400)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<pad>", unk_token="<unk>")
    model = build_tiny_llama(len(words), 3, 0)
    model.config.num_hidden_layers = 1
    folder = tmp_path / "other-student"
    model.model.layers = model.model.layers[:1]
    model.save_pretrained(folder)
    fast.save_pretrained(folder)
    return folder


def _parquet(tmp_path, model_dir, table: pa.Table):
    file = tmp_path / "data" / "train.parquet"
    file.parent.mkdir(exist_ok=True)
    pq.write_table(table, file)
    return ["generate", str(_write_recipe(tmp_path, _recipe(tmp_path, model_dir, data__train="data/train.parquet")))], \
        "train.parquet"


def _run_with(tmp_path, model_dir, command="generate", overrides=(), where="recipe.yaml:", **changes):
    return [command, str(_write_recipe(tmp_path, _recipe(tmp_path, model_dir, **changes))), *overrides], where


GOOD_ROWS = "".join(json.dumps({"prompt": f"hello number {i}?"}) + "\n" for i in range(3))

# name -> (builder(tmp_path, model_dir) -> (argv, file named in the error), words the error must contain)
CASES = {
    # --- the recipe --------------------------------------------------------------------------------
    "yaml syntax error": (lambda t, m: _recipe_text(t, "teacher:\n  model: x\nstudent: [1, 2\ndata: {}\n"),
                          ["recipe.yaml:4", "YAML"]),
    "recipe is binary": (lambda t, m: _recipe_text(t, bytes(range(256)) * 4), ["cannot read recipe"]),
    "empty recipe": (lambda t, m: _recipe_text(t, ""), ["empty"]),
    "recipe not a mapping": (lambda t, m: _recipe_text(t, "- teacher\n- student\n"), [":1", "mapping"]),
    "missing recipe file": (lambda t, m: (["generate", str(t / "nope.yaml")], "nope.yaml"), ["not found"]),
    "unknown top-level key": (lambda t, m: _run_with(t, m, trian={"steps": 3}), ['"trian"', "did you mean 'train'"]),
    "unknown nested key": (lambda t, m: _run_with(t, m, train__stpes=3), ['"train.stpes"', "'steps'"]),
    "wrong type": (lambda t, m: _run_with(t, m, train__steps="many"), ['"train.steps"', "integer"]),
    "zero steps": (lambda t, m: _run_with(t, m, train__steps=0), ['"train.steps"', "greater than 0"]),
    "negative learning rate": (lambda t, m: _run_with(t, m, train__lr=-0.1), ['"train.lr"']),
    "zero batch size": (lambda t, m: _run_with(t, m, generate__batch_size=0), ['"generate.batch_size"']),
    "negative max_new_tokens": (lambda t, m: _run_with(t, m, generate__max_new_tokens=-5), ['"generate.max_new_tokens"']),
    "top_p above one": (lambda t, m: _run_with(t, m, generate__top_p=1.5), ['"generate.top_p"']),
    "zero temperature": (lambda t, m: _run_with(t, m, train__temperature=0), ['"train.temperature"']),
    "unknown loss": (lambda t, m: _run_with(t, m, train__loss="kl"), ['"train.loss"', "forward_kl"]),
    "two student sources": (lambda t, m: _run_with(t, m, student__model=str(m)), ['"student"', "exactly one"]),
    "bad override value": (lambda t, m: _run_with(t, m, overrides=["train.steps=abc"], where="command line"), ["command line", '"train.steps"']),
    "unknown override key": (lambda t, m: _run_with(t, m, overrides=["train.stepz=3"], where="command line"), ["command line", "'steps'"]),
    "override without =": (lambda t, m: _run_with(t, m, overrides=["train.steps"], where="command line"), ["key.sub=value"]),
    # --- the data ------------------------------------------------------------------------------------
    "missing data file": (lambda t, m: _run_with(t, m, data__train="data/missing.jsonl", where="missing.jsonl"), ["missing.jsonl", "not found"]),
    "data path is a directory": (lambda t, m: _run_with(t, m, data__train="data", where="/data:"), ["directory"]),
    "empty data file": (lambda t, m: _with_train_file(t, m, "empty.jsonl", ""), ["no rows"]),
    "binary data file": (lambda t, m: _with_train_file(t, m, "blob.jsonl", bytes(range(128, 256)) * 8), [":1", "UTF-8"]),
    "unsupported extension": (lambda t, m: _with_train_file(t, m, "prompts.txt", "hello\n"), [".txt"]),
    "bad JSON line": (lambda t, m: _with_train_file(t, m, "t.jsonl", GOOD_ROWS + '{"prompt": "x",\n'), [":4", "invalid JSON"]),
    "JSON line not an object": (lambda t, m: _with_train_file(t, m, "t.jsonl", GOOD_ROWS + "[1, 2]\n"), [":4", "object"]),
    "missing prompt field": (lambda t, m: _with_train_file(t, m, "t.jsonl", GOOD_ROWS + '{"question": "hi"}\n'),
                             [":4", '"prompt"', "missing"]),
    "prompt not a string": (lambda t, m: _with_train_file(t, m, "t.jsonl", '{"prompt": 42}\n'), [":1", '"prompt"']),
    "empty prompt": (lambda t, m: _with_train_file(t, m, "t.jsonl", GOOD_ROWS + '{"prompt": "  "}\n'), [":4", '"prompt"']),
    "reference not a string": (lambda t, m: _with_train_file(t, m, "t.jsonl", '{"prompt": "hi", "reference": [1]}\n'),
                               [":1", '"reference"']),
    "malformed messages": (lambda t, m: _with_train_file(t, m, "t.jsonl", '{"messages": [{"role": "wizard", "content": "hi"}]}\n'),
                           [":1", "messages"]),
    "messages not a list": (lambda t, m: _with_train_file(t, m, "t.jsonl", '{"messages": "hi"}\n'), [":1", '"messages"']),
    "non-UTF-8 text": (lambda t, m: _with_train_file(t, m, "t.jsonl", GOOD_ROWS.encode() + b'{"prompt": "caf\xe9"}\n'),
                       [":4", "UTF-8"]),
    "huge row": (lambda t, m: _with_train_file(t, m, "t.jsonl", GOOD_ROWS + json.dumps({"prompt": "word " * 60_000}) + "\n"),
                 [":4", '"prompt"', "limit"]),
    "CSV without prompt column": (lambda t, m: _with_train_file(t, m, "t.csv", "question,answer\nhi,there\n"),
                                  ["t.csv", "prompt"]),
    "CSV wrong cell count": (lambda t, m: _with_train_file(t, m, "t.csv", "prompt,reference\nhi,there\nhello,a,b\n"),
                             ["t.csv:3", "cells"]),
    "Parquet wrong schema": (lambda t, m: _parquet(t, m, pa.table({"prompt": [1, 2, 3]})), ["train.parquet", '"prompt"']),
    "Parquet file that is not Parquet": (lambda t, m: _with_train_file(t, m, "x.parquet", "prompt\nhello\n"),
                                         ["x.parquet", "Parquet"]),
    # --- models and pairing ----------------------------------------------------------------------------
    "teacher not found": (lambda t, m: _run_with(t, m, teacher__model=str(t / "no-such-model")), ['"teacher.model"', "not found"]),
    "teacher folder is not a model": (lambda t, m: _run_with(t, m, teacher__model=str(t), where=t.name), ["config.json"]),
    "student larger than teacher": (lambda t, m: _run_with(t, m, "run", student={"config": {"num_hidden_layers": 8}}),
                                    ['"student"', "not fewer"]),
    "student vocabulary too small": (lambda t, m: _run_with(t, m, "run", student={"config": {"vocab_size": 50}}),
                                     ['"student"', "vocabulary"]),
    "student with another tokenizer": (lambda t, m: _run_with(t, m, "run", student={"model": str(_other_tokenizer_student(t))}),
                                       ['"student.model"', "tokenizer"]),
    "student layer out of range": (lambda t, m: _run_with(t, m, "run", student__from_teacher__layers=[0, 9]),
                                   ['"student.from_teacher.layers"', "out of range"]),
    "student wider than teacher": (lambda t, m: _run_with(t, m, "run", student__from_teacher__intermediate_size=4096),
                                   ['"student.from_teacher.intermediate_size"']),
    # --- where results go ----------------------------------------------------------------------------------
    "out is under a file": (lambda t, m: (t / "a-file").write_text("x") and _run_with(t, m, "run", out=str(t / "a-file" / "out"), where="a-file/out"),
                            ['"out"', "cannot write"]),
    "cache is a file": (lambda t, m: (t / "cache-file").write_text("x") and _run_with(t, m, "generate", cache=str(t / "cache-file"), where="cache-file"),
                        ['"cache"', "cannot write"]),
    "train before generate": (lambda t, m: _run_with(t, m, "train", where="/cache:"), ["not in the teacher cache", "distil generate"]),
}


def _invoke(argv: list[str], capsys, monkeypatch) -> tuple[int, str]:
    capsys.readouterr()  # drop what building the case printed
    monkeypatch.setattr(sys, "argv", ["distil", *argv])
    with pytest.raises(SystemExit) as exit_info:
        cli.main()
    return exit_info.value.code, capsys.readouterr().err


def _leftovers(folder: Path) -> list[str]:
    """Files under `folder` (cache temporaries included), as relative paths."""
    if not folder.is_dir():
        return []
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


def test_there_are_at_least_thirty_cases():
    assert len(CASES) >= 30


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input(name, tmp_path, tiny_model_dir, prompts_files, distil_home, capsys, monkeypatch):
    build, words = CASES[name]
    argv, file = build(tmp_path, tiny_model_dir)
    code, err = _invoke(argv, capsys, monkeypatch)
    lines = err.strip().splitlines()
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    assert file in lines[0], lines[0]
    for word in words:
        assert word in lines[0], (word, lines[0])
    assert _leftovers(tmp_path / "out") == []
    assert not [p for p in _leftovers(tmp_path / "cache") if "tmp" in p]


@pytest.mark.parametrize("name", ["bad JSON line", "unknown nested key", "student larger than teacher"])
def test_bad_input_in_a_real_process(name, tmp_path, tiny_model_dir, prompts_files, distil_home):
    argv, file = CASES[name][0](tmp_path, tiny_model_dir)
    proc = run_cli(*argv, env_extra={"DISTIL_HOME": str(distil_home)})
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and file in lines[0], proc.stderr
    debug = run_cli("--debug", *argv, env_extra={"DISTIL_HOME": str(distil_home)})
    assert debug.returncode != 0 and "Traceback" in debug.stderr
    assert not os.path.exists(tmp_path / "out") or _leftovers(tmp_path / "out") == []
