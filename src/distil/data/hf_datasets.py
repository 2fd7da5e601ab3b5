"""Hugging Face datasets as prompt sources: a `save_to_disk` folder, or `hf:NAME[:SPLIT]` from the hub.

`hf:NAME[:SPLIT]` goes through `datasets.load_dataset(NAME, split=SPLIT)` (SPLIT defaults to
train), so NAME is whatever that takes: a hub id (`tatsu-lab/alpaca`), or a local folder of
data files. The rows then read like a Parquet file's (`distil.data.examples`). Needs the
`datasets` extra.

Example:
    >>> dataset = open_dataset("hf:HuggingFaceH4/no_robots:test")
    >>> dataset = open_dataset("prompts-folder")  # written by Dataset.save_to_disk
"""

from __future__ import annotations

from pathlib import Path

from distil.errors import DistilError

HUB_PREFIX = "hf:"
# Files `Dataset.save_to_disk` / `DatasetDict.save_to_disk` write at the top of their folder.
SAVED_MARKERS = ("state.json", "dataset_dict.json")


def is_dataset_source(location) -> bool:
    """Whether a data location names a Hugging Face dataset (hf:..., or a save_to_disk folder)."""
    text = str(location)
    return text.startswith(HUB_PREFIX) or any((Path(text) / marker).is_file() for marker in SAVED_MARKERS)


def open_dataset(location: str):
    """The `datasets.Dataset` at `location` (see the module docstring).

    Raises:
        DistilError: datasets is not installed; the dataset cannot be loaded; a folder holds
            several splits (a DatasetDict) and none is named.
    """
    try:
        import datasets
    except ImportError:
        raise DistilError("reading a Hugging Face dataset needs the datasets package: "
                          "pip install 'distil[datasets]'", file=location) from None
    if location.startswith(HUB_PREFIX):
        name, _, split = location[len(HUB_PREFIX):].partition(":")
        if not name:
            raise DistilError("expected hf:NAME or hf:NAME:SPLIT, e.g. hf:tatsu-lab/alpaca:train", file=location)
        try:
            return datasets.load_dataset(name, split=split or "train")
        except Exception as e:  # the hub, the builders and the split check each raise their own types
            raise DistilError(f"cannot load the dataset: {_one_line(e)}", file=location) from None
    try:
        dataset = datasets.load_from_disk(location)
    except Exception as e:
        raise DistilError(f"cannot load the saved dataset: {_one_line(e)}", file=location) from None
    if isinstance(dataset, datasets.DatasetDict):
        splits = list(dataset)
        raise DistilError(f"holds several splits ({', '.join(splits)}); name one folder inside it, e.g. "
                          f"{Path(location) / splits[0]}", file=location)
    return dataset


def _one_line(error: Exception) -> str:
    return " ".join(f"{type(error).__name__}: {error}".split())[:300]
