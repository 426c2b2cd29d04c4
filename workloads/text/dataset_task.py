"""`task: dataset`: any dataset as a task, described by the config's `dataset:` block.

    dataset:
      path: examples/capitals/capitals.jsonl   # a .jsonl/.json/.parquet/.csv file, a directory (save_to_disk,
                                               #   or <split>.<ext> files), or a Hugging Face hub id
      prompt: "What is the capital of {country}?"   # a field, or a template over fields
      answer: capital                          # the field(s) the reward and SFT compare against
      completion: null                         # what SFT trains on (default: the first answer)
      splits: {validation: train}              # our split -> the source's (default: the same name)

Input i of a split is row i of the source split, so every worker reads the same input for
an `input_id`. A single file is one split, `train`. Relative paths are resolved against
the sweep file's directory when the sweep is read (orchestrator/spec.py).

Workers on other nodes must see the data the driver saw: before any trial starts, the
driver writes every split a sweep's dataset tasks read into the results root
(`<sweep>/task_data/<digest>/<split>.parquet`, local or s3://; `write_snapshots`), and
every trial process reads from there (`use_snapshots`) -- the original file need not
exist on the worker, and a file edited during the sweep changes nothing.

Hub ids go through `datasets.load_dataset(path, name, split=...)`, the same call a local
directory of split files takes; without network an uncached id is one line naming it.
Torch-free; `datasets` is imported when data is read.
"""

from __future__ import annotations

import hashlib
import json
import os
import string
from typing import Optional, Union

from pydantic import Field, field_validator

from ..core.availability import DatasetNotAvailableError, dataset_in_hub_cache, hub_endpoint, hub_state, hub_unavailable
from ..core.config import StrictConfig
from .task_base import Task, TextExample

NAMES = ("dataset",)  # registered in workloads/text/tasks.py
TAKES_DATASET = True
FILE_FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
OUR_SPLITS = ("train", "validation", "test")


class DatasetSpec(StrictConfig):
    """A dataset as a task: where it is and which fields are prompt and answer."""

    path: str = Field(description=(
        "a local .jsonl / .json / .parquet / .csv file (one split: train), a directory (written by "
        "datasets' save_to_disk, or holding <split>.<ext> files), or a Hugging Face hub id; relative "
        "paths are read from the sweep file's directory"))
    name: Optional[str] = Field(None, description="the hub dataset's configuration (load_dataset(path, name))")
    splits: dict[str, str] = Field({}, description=(
        "our split (train, validation, test) -> the source's split it reads; a split not named reads the "
        "source's split of the same name (a single file has only train: e.g. {validation: train})"))
    prompt: str = Field("prompt", description=(
        "the field holding the prompt, or a template over fields in Python format syntax "
        "(\"Question: {question}\")"))
    answer: Union[str, list[str]] = Field("answer", description=(
        "the field(s) holding reference answers: every value is a reference the reward compares against "
        "(a list-valued field gives several); the first is SFT's target unless `completion` is set"))
    completion: Optional[str] = Field(None, description="the field SFT trains on (default: the first answer)")

    @field_validator("splits")
    @classmethod
    def _our_splits(cls, splits: dict[str, str]) -> dict[str, str]:
        unknown = sorted(set(splits) - set(OUR_SPLITS))
        if unknown:
            raise ValueError(f"splits names {unknown}; the keys are our splits, allowed: {list(OUR_SPLITS)}")
        return splits

    @property
    def answer_fields(self) -> list[str]:
        return [self.answer] if isinstance(self.answer, str) else list(self.answer)

    def prompt_fields(self) -> list[str]:
        """The fields the prompt reads: the template's placeholders, or the one field it names."""
        try:
            fields = [name for _, name, _, _ in string.Formatter().parse(self.prompt) if name is not None]
        except ValueError as error:
            raise ValueError(f"dataset.prompt = {self.prompt!r} is not a valid template: {error}") from None
        if any(not name or not name.isidentifier() for name in fields):
            raise ValueError(f"dataset.prompt = {self.prompt!r}: a template names fields as {{field}} "
                             "(no positional {} or expressions)")
        return fields or [self.prompt]

    def source_key(self) -> str:
        return json.dumps([self.path, self.name])


# ---------------------------------------------------------------------------
# where the data is read from: the source, or the driver's snapshot of it
# ---------------------------------------------------------------------------

_SNAPSHOTS: dict[str, str] = {}  # source_key -> URI of the directory holding <split>.parquet


def use_snapshots(snapshots: dict[str, str]) -> None:
    """Read these sources from the driver's snapshots (set in every trial process before its
    config is validated: a task object reads its data once)."""
    _SNAPSHOTS.clear()
    _SNAPSHOTS.update(snapshots)


def _looks_like_path(path: str) -> bool:
    return path.startswith(("/", ".", "~")) or path.count("/") > 1 or os.path.splitext(path)[1] in FILE_FORMATS


def load_source_split(spec: DatasetSpec, split: str):
    """One split of the source as a pyarrow Table, or None when the source has no such split."""
    if spec.source_key() in _SNAPSHOTS:
        return _read_snapshot(_SNAPSHOTS[spec.source_key()], split)
    import datasets

    datasets.disable_progress_bars()  # "Generating train split" per file: rlgrad's console says what matters
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)  # a parse error is our one line, not also its log line
    path = spec.path
    where = f"dataset.path {path!r}"
    try:
        if os.path.isfile(path):
            suffix = os.path.splitext(path)[1].lower()
            if suffix not in FILE_FORMATS:
                raise DatasetNotAvailableError(f"{where}: a file must end in one of {list(FILE_FORMATS)} "
                                               f"(got {suffix or 'no suffix'!r})")
            if split != "train":
                return None
            loaded = datasets.load_dataset(FILE_FORMATS[suffix], data_files={"train": path}, split="train")
        elif os.path.isdir(path) and (os.path.exists(os.path.join(path, "dataset_dict.json"))
                                      or os.path.exists(os.path.join(path, "state.json"))):
            saved = datasets.load_from_disk(path)
            if isinstance(saved, datasets.DatasetDict):
                if split not in saved:
                    return None
                saved = saved[split]
            elif split != "train":
                return None
            loaded = saved
        elif os.path.isdir(path) or not _looks_like_path(path):
            if not os.path.isdir(path) and hub_unavailable() and not dataset_in_hub_cache(path):
                raise DatasetNotAvailableError(
                    f"{where} is no local file or directory, and as a hub id it is not cached here while the hub "
                    f"({hub_endpoint()}) is {hub_state()}; give a local .jsonl/.json/.parquet/.csv file or directory")
            try:
                loaded = datasets.load_dataset(path, spec.name, split=split)
            except ValueError as error:  # "Unknown split": the source has no such split
                if "split" in str(error).lower():
                    return None
                raise
        else:
            raise DatasetNotAvailableError(f"{where}: no such file or directory")
    except DatasetNotAvailableError:
        raise
    except Exception as error:  # datasets raises many types for a file that is not its format
        cause = error.__cause__ or error  # datasets wraps the parser's error ("An error occurred while generating")
        first = str(cause).strip().splitlines()[0] if str(cause).strip() else ""
        raise DatasetNotAvailableError(f"{where} could not be read as a dataset ({type(cause).__name__}: "
                                       f"{first[:300]})") from None
    return loaded.with_format("arrow")[:] if len(loaded) else loaded.data.table


def _read_snapshot(uri: str, split: str):
    import pyarrow.parquet as pq

    from ..core.storage import ResultsRoot

    root = ResultsRoot(uri)
    if not root.is_file(f"{split}.parquet"):
        return None
    return pq.read_table(root.path(f"{split}.parquet"), filesystem=root.fs)


def _digest(tables: dict[str, object]) -> str:
    import pyarrow as pa

    digest = hashlib.sha256()
    for split in sorted(tables):
        sink = pa.BufferOutputStream()
        with pa.ipc.new_stream(sink, tables[split].schema) as writer:
            writer.write_table(tables[split])
        digest.update(split.encode() + b"\0" + sink.getvalue().to_pybytes())
    return digest.hexdigest()[:16]


def write_snapshots(specs: list[DatasetSpec], root, sweep: str) -> dict[str, str]:
    """The driver's side: every split the specs read, written once under <sweep>/task_data/<digest>/
    of the results root; returns source_key -> the snapshot's URI (what `use_snapshots` takes)."""
    snapshots = {}
    for spec in specs:
        if spec.source_key() in snapshots:
            continue
        tables = {}
        for split in dict.fromkeys(spec.splits.get(s, s) for s in OUR_SPLITS):
            table = load_source_split(spec, split)
            if table is not None:
                tables[split] = table
        digest = _digest(tables)
        for split, table in tables.items():
            if not root.is_file(sweep, "task_data", digest, f"{split}.parquet"):
                root.write_parquet(sweep, "task_data", digest, f"{split}.parquet", table=table)
        snapshots[spec.source_key()] = root.uri(sweep, "task_data", digest)
    return snapshots


# ---------------------------------------------------------------------------
# the task
# ---------------------------------------------------------------------------

class DatasetTask(Task):
    default_reward = "exact_match"

    def __init__(self, name: str, options):
        super().__init__(name, options)
        if options.dataset is None:
            raise ValueError("task: dataset needs a `dataset:` block (path, prompt, answer; "
                             "workloads/text/dataset_task.py)")
        self.spec = DatasetSpec.model_validate(options.dataset)
        self.templated = self.spec.prompt_fields() != [self.spec.prompt]  # else: the prompt is one field
        self._tables: dict[str, object] = {}

    def _table(self, split: str):
        if split not in OUR_SPLITS:
            raise ValueError(f"unknown split {split!r}; allowed: {list(OUR_SPLITS)}")
        source = self.spec.splits.get(split, split)
        if source not in self._tables:
            table = load_source_split(self.spec, source)
            if table is None:
                raise DatasetNotAvailableError(
                    f"dataset.path {self.spec.path!r} has no split {source!r} (our {split!r}); map it with "
                    f"dataset.splits, e.g. {{{split}: train}}")
            self._tables[source] = table
        return self._tables[source]

    def has_split(self, split: str) -> bool:
        try:
            self._table(split)
        except DatasetNotAvailableError:
            return False
        return True

    def check_data(self) -> None:
        """The train split reads, is not empty, and holds every field the prompt, answer and completion name."""
        table = self._table("train")
        where = f"dataset.path {self.spec.path!r}"
        if table.num_rows == 0:
            raise DatasetNotAvailableError(f"{where}: the train split ({self.spec.splits.get('train', 'train')}) "
                                           "has no rows")
        have = table.column_names
        for what, fields in (("prompt", self.spec.prompt_fields()), ("answer", self.spec.answer_fields),
                             ("completion", [self.spec.completion] if self.spec.completion else [])):
            missing = [f for f in fields if f not in have]
            if missing:
                raise DatasetNotAvailableError(f"{where}: dataset.{what} names field(s) {missing} that the data "
                                               f"lacks; it has {have}")

    def split_size(self, split: str) -> int:
        return self._table(split).num_rows

    def examples(self, split: str, indices: list[int]) -> list[TextExample]:
        table, spec = self._table(split), self.spec
        examples = []
        for index in indices:
            if not 0 <= index < table.num_rows:
                raise IndexError(f"input {index} out of range for split {split!r} of {spec.path!r} "
                                 f"({table.num_rows} inputs)")
            row = table.slice(index, 1).to_pylist()[0]
            prompt = spec.prompt.format_map(row) if self.templated else str(row[spec.prompt])
            answers = []
            for name in spec.answer_fields:
                value = row[name]
                answers += [str(v) for v in value] if isinstance(value, (list, tuple)) else [str(value)]
            target = str(row[spec.completion]) if spec.completion else answers[0]
            examples.append(TextExample(index, prompt, target, tuple(answers),
                                        (target,) if spec.completion else None, columns=row))
        return examples

    def columns(self, example) -> dict:
        return dict(example.columns)


def make_task(name: str, options) -> DatasetTask:
    return DatasetTask(name, options)
