"""Local copies of datasets: what every workload reads when a config sets
`dataset_path` (no hub needed).

A local copy is either a directory written by `datasets`' save_to_disk (a
DatasetDict, or one Dataset per split in <path>/<split>/), or files per split:
<path>/<split>.<ext>, <path>/<split>-*.<ext> or <path>/<split>/*.<ext> with
ext one of parquet, jsonl, json, csv. `datasets` is imported when data is read.
"""

from __future__ import annotations

import glob
import os

from .availability import DatasetNotAvailableError

LOCAL_FORMATS = {"parquet": "parquet", "jsonl": "json", "json": "json", "csv": "csv"}


def local_split_files(path: str, split: str) -> tuple[str, list[str]] | None:
    """(datasets builder, files) of `split` in a directory of split files, or None."""
    for extension, builder in LOCAL_FORMATS.items():
        files = sorted({*glob.glob(os.path.join(path, f"{split}.{extension}")),
                        *glob.glob(os.path.join(path, f"{split}-*.{extension}")),
                        *glob.glob(os.path.join(path, split, f"*.{extension}"))})
        if files:
            return builder, files
    return None


def load_local_split(path: str, split: str):
    """One split of a local copy as a `datasets.Dataset`, or None when the copy
    has no such split. Raises DatasetNotAvailableError when `path` does not exist."""
    import datasets

    if not os.path.exists(path):
        raise DatasetNotAvailableError(f"dataset_path {path!r} does not exist")
    if os.path.exists(os.path.join(path, "dataset_dict.json")):
        saved = datasets.load_from_disk(path)
        return saved[split] if split in saved else None
    if os.path.exists(os.path.join(path, split, "state.json")):
        return datasets.load_from_disk(os.path.join(path, split))
    found = local_split_files(path, split)
    if found is None:
        return None
    builder, files = found
    return datasets.load_dataset(builder, data_files={split: files}, split=split)
