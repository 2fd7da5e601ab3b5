"""Tests for distil.data: loading examples (and every way a data file can be wrong) and prompts."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from distil.data.examples import Example, format_prompt, load_examples
from distil.errors import DistilError

QUICKSTART = Path(__file__).resolve().parent.parent / "data" / "quickstart"


def write(path: Path, text: str | bytes) -> Path:
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8", newline="")
    return path


def jsonl(path: Path, *rows) -> Path:
    """Write rows (objects, or raw strings written as they are) one per line."""
    lines = [r if isinstance(r, str) else json.dumps(r) for r in rows]
    return write(path, "\n".join(lines) + "\n")


def load_error(path, *, line=None, row=None, field=None) -> DistilError:
    """Load `path`, expecting a DistilError at exactly this place; return it."""
    with pytest.raises(DistilError) as info:
        load_examples(path)
    err = info.value
    assert err.file == os.fspath(path)
    assert (err.line, err.row, err.field) == (line, row, field), str(err)
    assert "\n" not in str(err)
    return err


# --- JSONL ---------------------------------------------------------------------------------


def test_jsonl_prompt_and_messages(tmp_path):
    path = jsonl(tmp_path / "p.jsonl",
                 {"prompt": "Hi?", "reference": "Hello.", "category": "chat", "language": "en",
                  "extra": [1, 2]},
                 "",
                 {"messages": [{"role": "system", "content": "Be brief."},
                               {"role": "user", "content": "Why?", "name": "bob"}],
                  "reference": None})
    first, second = load_examples(path)
    assert first == Example(messages=({"role": "user", "content": "Hi?"},), reference="Hello.",
                            category="chat", language="en", source=f"{path}:1")
    assert second.messages == ({"role": "system", "content": "Be brief."},
                               {"role": "user", "content": "Why?"})
    assert second.reference is None and second.category is None
    assert second.source == f"{path}:3"  # the blank line 2 is skipped but still counted
    assert second.prompt == "Why?"


def test_jsonl_accepts_a_bom_and_str_or_pathlike(tmp_path):
    path = write(tmp_path / "p.jsonl", "\ufeff" + json.dumps({"prompt": "é"}) + "\n")
    assert load_examples(str(path))[0].messages[0]["content"] == "é"


def test_missing_file(tmp_path):
    err = load_error(tmp_path / "nope.jsonl")
    assert "not found" in str(err)


def test_directory(tmp_path):
    (tmp_path / "d.jsonl").mkdir()
    load_error(tmp_path / "d.jsonl")


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root reads anything")
def test_unreadable_file(tmp_path):
    path = jsonl(tmp_path / "p.jsonl", {"prompt": "x"})
    path.chmod(0)
    load_error(path)


def test_unknown_extension(tmp_path):
    err = load_error(write(tmp_path / "p.txt", "hello\n"))
    assert ".txt" in str(err)


@pytest.mark.parametrize("text", ["", "\n\n  \n"])
def test_empty_jsonl(tmp_path, text):
    load_error(write(tmp_path / "p.jsonl", text))


def test_not_utf8_names_the_line(tmp_path):
    path = write(tmp_path / "p.jsonl", b'{"prompt": "a"}\n{"prompt": "b"}\n{"prompt": "\xff"}\n')
    assert "UTF-8" in str(load_error(path, line=3))


def test_bad_json_line(tmp_path):
    path = jsonl(tmp_path / "p.jsonl", {"prompt": "a"}, '{"prompt": "b",}')
    assert "invalid JSON" in str(load_error(path, line=2))


def test_json_that_is_not_an_object(tmp_path):
    path = jsonl(tmp_path / "p.jsonl", {"prompt": "a"}, '["a", "b"]')
    assert "got list" in str(load_error(path, line=2))


def test_missing_prompt_and_messages(tmp_path):
    load_error(jsonl(tmp_path / "p.jsonl", {"reference": "x"}), line=1, field="prompt")


def test_prompt_and_messages_together(tmp_path):
    path = jsonl(tmp_path / "p.jsonl",
                 {"prompt": "a", "messages": [{"role": "user", "content": "a"}]})
    load_error(path, line=1, field="prompt")


@pytest.mark.parametrize("row, field, says", [
    ({"prompt": 3}, "prompt", "got int"),
    ({"prompt": ""}, "prompt", "got empty string"),
    ({"prompt": "   "}, "prompt", "got empty string"),
    ({"messages": "hi"}, "messages", "got string"),
    ({"messages": []}, "messages", "got empty list"),
    ({"messages": ["hi"]}, "messages[0]", "got string"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                   {"role": "robot", "content": "c"}]}, "messages[2].role", "'robot'"),
    ({"messages": [{"content": "a"}]}, "messages[0].role", "got null"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": 5}]},
     "messages[1].content", "got int"),
    ({"prompt": "a", "reference": 1.5}, "reference", "got float"),
    ({"prompt": "a", "category": ["x"]}, "category", "got list"),
    ({"prompt": "a", "language": True}, "language", "got bool"),
])
def test_wrong_types(tmp_path, row, field, says):
    path = jsonl(tmp_path / "p.jsonl", {"prompt": "fine"}, row)
    err = load_error(path, line=2, field=field)
    assert says in str(err)


def test_message_format(tmp_path):
    path = jsonl(tmp_path / "x.jsonl", {"prompt": "a"}, {"prompt": "b"}, {"prompt": 7})
    assert str(load_error(path, line=3, field="prompt")) == (
        f'{path}:3: field "prompt": expected a non-empty string, got int')


# --- CSV -----------------------------------------------------------------------------------


def test_csv_prompt_and_messages(tmp_path):
    chat = json.dumps([{"role": "user", "content": "Hey"}]).replace('"', '""')
    path = write(tmp_path / "p.csv",
                 "\ufeffprompt,messages,reference,category,notes\r\n"
                 '"Two\nlines, with a comma",,Ref,,ignored\r\n'
                 "\r\n"
                 f',"{chat}",,food,\r\n')
    first, second = load_examples(path)
    assert first.messages == ({"role": "user", "content": "Two\nlines, with a comma"},)
    assert (first.reference, first.category, first.language) == ("Ref", None, None)
    assert first.source == f"{path}:2"
    assert second.messages == ({"role": "user", "content": "Hey"},)
    assert (second.reference, second.category) == (None, "food")
    assert second.source == f"{path}:5"  # the quoted cell spans lines 2-3, line 4 is blank


def test_csv_error_line_is_where_the_row_starts(tmp_path):
    path = write(tmp_path / "p.csv", 'prompt,category\n"a\nb\nc",x\n"d",\n,y\n')
    load_error(path, line=6, field="prompt")  # lines: header, "a, b, c",x, "d", then ,y


def test_csv_without_prompt_column(tmp_path):
    err = load_error(write(tmp_path / "p.csv", "question,answer\nhi,there\n"),
                     line=1, field="prompt")
    assert "question" in str(err)


def test_csv_messages_cell_is_bad_json(tmp_path):
    path = write(tmp_path / "p.csv", 'messages\n"[{""role"": ""user""}"\n')
    load_error(path, line=2, field="messages")


def test_csv_messages_cell_with_bad_role(tmp_path):
    path = write(tmp_path / "p.csv", 'messages\n"[{""role"": ""bot"", ""content"": ""x""}]"\n')
    load_error(path, line=2, field="messages[0].role")


def test_csv_wrong_cell_count(tmp_path):
    load_error(write(tmp_path / "p.csv", "prompt,reference\na,b\nc,d,e\n"), line=3)


@pytest.mark.parametrize("text", ["", "prompt,reference\n"])
def test_csv_without_rows(tmp_path, text):
    load_error(write(tmp_path / "p.csv", text))


def test_csv_not_utf8(tmp_path):
    load_error(write(tmp_path / "p.csv", b"prompt\nok\ncaf\xe9\n"), line=3)


# --- Parquet -------------------------------------------------------------------------------


def parquet(path: Path, table: dict | pa.Table) -> Path:
    pq.write_table(table if isinstance(table, pa.Table) else pa.table(table), path)
    return path


def test_parquet_prompt(tmp_path):
    path = parquet(tmp_path / "p.parquet", {"prompt": ["a", "b"], "reference": ["x", None],
                                            "score": [1, 2]})
    first, second = load_examples(path)
    assert first.messages == ({"role": "user", "content": "a"},)
    assert (first.reference, second.reference) == ("x", None)
    assert second.source == f"{path}: row 2"


def test_parquet_messages(tmp_path):
    chats = [[{"role": "system", "content": "S"}, {"role": "user", "content": "U"}]]
    path = parquet(tmp_path / "p.parquet", {"messages": chats, "language": ["fr"]})
    (example,) = load_examples(path)
    assert example.messages == tuple(chats[0])
    assert example.language == "fr"


def test_parquet_messages_as_json_text(tmp_path):
    path = parquet(tmp_path / "p.parquet",
                   {"messages": [json.dumps([{"role": "user", "content": "U"}])]})
    assert load_examples(path)[0].messages == ({"role": "user", "content": "U"},)


def test_parquet_unreadable(tmp_path):
    load_error(write(tmp_path / "p.parquet", b"this is not parquet"))


def test_parquet_prompt_column_not_strings(tmp_path):
    err = load_error(parquet(tmp_path / "p.parquet", {"prompt": [1, 2]}), field="prompt")
    assert "int64" in str(err)


def test_parquet_reference_column_not_strings(tmp_path):
    load_error(parquet(tmp_path / "p.parquet", {"prompt": ["a"], "reference": [1.0]}),
               field="reference")


def test_parquet_without_prompt_column(tmp_path):
    load_error(parquet(tmp_path / "p.parquet", {"text": ["a"]}), field="prompt")


def test_parquet_bad_row(tmp_path):
    path = parquet(tmp_path / "p.parquet", {"prompt": ["a", "b", None]})
    load_error(path, row=3, field="prompt")


def test_parquet_bad_message_row(tmp_path):
    chats = [[{"role": "user", "content": "U"}], [{"role": "bot", "content": "B"}]]
    load_error(parquet(tmp_path / "p.parquet", {"messages": chats}),
               row=2, field="messages[0].role")


def test_parquet_without_rows(tmp_path):
    load_error(parquet(tmp_path / "p.parquet", pa.table({"prompt": pa.array([], pa.string())})))


# --- format_prompt -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def chat_tokenizer():
    """A tiny word-level tokenizer with a chat template, built offline."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["[UNK]", "hello", "world", "user", "assistant", "system"]
    inner = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    inner.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=inner, unk_token="[UNK]")
    tokenizer.chat_template = (
        "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}<assistant>{% endif %}")
    return tokenizer


USER = ({"role": "user", "content": "hello"},)


def test_format_prompt_with_chat_template(chat_tokenizer):
    assert format_prompt(chat_tokenizer, USER) == "<user>hello\n<assistant>"


def test_format_prompt_adds_system_prompt(chat_tokenizer):
    assert format_prompt(chat_tokenizer, USER, system_prompt="Be brief.") == (
        "<system>Be brief.\n<user>hello\n<assistant>")


def test_format_prompt_keeps_an_existing_system_message(chat_tokenizer):
    chat = ({"role": "system", "content": "Mine."},) + USER
    assert format_prompt(chat_tokenizer, chat, system_prompt="Other.") == (
        "<system>Mine.\n<user>hello\n<assistant>")


def test_format_prompt_does_not_change_the_messages(chat_tokenizer):
    chat = [{"role": "user", "content": "hello"}]
    format_prompt(chat_tokenizer, chat, system_prompt="S")
    assert chat == [{"role": "user", "content": "hello"}]


def test_format_prompt_without_chat_template(chat_tokenizer):
    plain = chat_tokenizer.__class__(tokenizer_object=chat_tokenizer.backend_tokenizer)
    assert not plain.chat_template
    chat = USER + ({"role": "assistant", "content": "hi"}, {"role": "user", "content": "bye"})
    assert format_prompt(plain, chat) == "hello\nhi\nbye\n"
    assert format_prompt(plain, USER, system_prompt="S") == "S\nhello\n"
    assert format_prompt(None, USER) == "hello\n"


# --- the shipped quickstart data -------------------------------------------------------------


def test_shipped_quickstart_data_loads():
    train = load_examples(QUICKSTART / "train.jsonl")
    evaluation = load_examples(QUICKSTART / "eval.jsonl")
    assert len(train) >= 500 and len(evaluation) >= 50
    prompts = [e.prompt.casefold() for e in train + evaluation]
    assert len(set(prompts)) == len(prompts)  # deduplicated, and no eval prompt in train
    assert all(e.language == "en" and e.category for e in train + evaluation)


def test_example_location_reads_back_its_source():
    chat = ({"role": "user", "content": "hi"},)
    assert Example(chat, source="d/train.jsonl:12").location == {"file": "d/train.jsonl", "line": 12}
    assert Example(chat, source="d/train.parquet: row 7").location == {"file": "d/train.parquet", "row": 7}
    assert Example(chat).location == {"file": None}
