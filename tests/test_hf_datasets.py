"""Hugging Face datasets as prompt sources: a save_to_disk folder (and hf:NAME[:SPLIT] on a local data folder)."""

from __future__ import annotations

import json

import pytest

from distil import pipeline
from distil.data.examples import load_examples
from distil.data.splits import load_data
from distil.errors import DistilError
from distil.generation.cache import TeacherCache
from distil.generation.view import TeacherPrompts

datasets = pytest.importorskip("datasets")


def jsonl_rows(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_a_saved_dataset_reads_as_its_jsonl_and_fills_the_same_cache_rows(load, prompts_files, tmp_path):
    train, held_out = prompts_files
    datasets.Dataset.from_list(jsonl_rows(train)).save_to_disk(str(tmp_path / "train-ds"))
    datasets.Dataset.from_list(jsonl_rows(held_out)).save_to_disk(str(tmp_path / "eval-ds"))
    from_files = load()
    from_datasets = load("data.train=train-ds", "data.eval=eval-ds")  # relative to the recipe's folder
    files_train, files_eval = load_data(from_files)
    ds_train, ds_eval = load_data(from_datasets)
    assert [e.messages for e in ds_train] == [e.messages for e in files_train] and len(ds_train) == 24
    assert [(e.messages, e.reference, e.category) for e in ds_eval] == \
        [(e.messages, e.reference, e.category) for e in files_eval]
    assert ds_train[3].source == f"{tmp_path / 'train-ds'}: row 4"
    summary = pipeline.generate(from_datasets)
    assert summary["generated"] == 32
    keys = TeacherPrompts(from_files).keys(files_train + files_eval)
    assert TeacherCache(from_datasets.cache_dir).keys() == set(keys)  # the same rows a JSONL recipe asks for
    assert pipeline.generate(from_files)["generated"] == 0


def test_messages_column_and_bad_columns(tmp_path):
    chat = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "why sky blue?"}]
    datasets.Dataset.from_list([{"messages": chat, "language": "en"}]).save_to_disk(str(tmp_path / "chat"))
    (ex,) = load_examples(tmp_path / "chat")
    assert ex.messages == tuple(chat) and ex.language == "en"
    datasets.Dataset.from_list([{"prompt": 3}]).save_to_disk(str(tmp_path / "numbers"))
    with pytest.raises(DistilError) as e:
        load_examples(tmp_path / "numbers")
    assert e.value.field == "prompt" and "expected a string column" in str(e.value)
    datasets.Dataset.from_list([{"question": "hi?"}]).save_to_disk(str(tmp_path / "other"))
    with pytest.raises(DistilError) as e:
        load_examples(tmp_path / "other")
    assert 'needs a "prompt" or "messages" column; found question' in str(e.value)
    datasets.Dataset.from_list([{"prompt": "x", "messages": "[not json"}]).save_to_disk(str(tmp_path / "both"))
    with pytest.raises(DistilError) as e:
        load_examples(tmp_path / "both")
    assert e.value.field == "messages" and e.value.row == 1


def test_a_dataset_dict_folder_names_its_splits(tmp_path):
    splits = datasets.DatasetDict({"train": datasets.Dataset.from_list([{"prompt": "a?"}, {"prompt": "b?"}]),
                                   "test": datasets.Dataset.from_list([{"prompt": "c?"}])})
    splits.save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(DistilError) as e:
        load_examples(tmp_path / "dd")
    assert "holds several splits (train, test)" in str(e.value) and str(tmp_path / "dd" / "train") in str(e.value)
    assert [ex.prompt for ex in load_examples(tmp_path / "dd" / "test")] == ["c?"]


def test_hf_name_goes_through_load_dataset(tmp_path, monkeypatch):
    """hf:NAME[:SPLIT] is datasets.load_dataset(NAME, split=SPLIT): a local folder of data files stands in for a
    hub id here (this machine reaches no hub)."""
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))
    folder = tmp_path / "hub-like"
    folder.mkdir()
    (folder / "train.jsonl").write_text('{"prompt": "one?"}\n{"prompt": "two?"}\n')
    (folder / "test.jsonl").write_text('{"prompt": "three?"}\n')
    assert [ex.prompt for ex in load_examples(f"hf:{folder}")] == ["one?", "two?"]
    assert [ex.prompt for ex in load_examples(f"hf:{folder}:test")] == ["three?"]
    with pytest.raises(DistilError) as e:
        load_examples(f"hf:{folder}:validation")
    assert "cannot load the dataset" in str(e.value) and "validation" in str(e.value)
    with pytest.raises(DistilError) as e:
        load_examples("hf:")
    assert "expected hf:NAME or hf:NAME:SPLIT" in str(e.value)


def test_a_plain_folder_is_still_an_error(tmp_path):
    (tmp_path / "folder").mkdir()
    with pytest.raises(DistilError) as e:
        load_examples(tmp_path / "folder")
    assert "is a directory" in str(e.value) and "save_to_disk" in str(e.value)
