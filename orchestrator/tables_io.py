"""Reading a sweep's Parquet tables back, schema-checked.

`read_table(results, sweep, "samples")` unions every shard under
<results>/<sweep>/samples/ (hidden temporary files are ignored, so a write
in progress is never read) after checking each shard's schema version.
"""

from __future__ import annotations

import posixpath

import pyarrow as pa
import pyarrow.fs as pafs

from workloads.core.tables import SCHEMAS, check_schema
from workloads.core.storage import resolve


def table_dir(results: str, sweep: str, name: str) -> tuple[pafs.FileSystem, str]:
    fs, base = resolve(results)
    return fs, posixpath.join(base, sweep, name)


def shard_dataset(results: str, sweep: str, name: str, stage: str | None = None,
                  trial: str | None = None):
    """A lazy dataset over all shards of table `name` (of one stage / trial if given), or None."""
    if name not in SCHEMAS:
        raise ValueError(f"unknown table {name!r}; allowed: {sorted(SCHEMAS)}")
    fs, path = table_dir(results, sweep, name)
    path = posixpath.join(path, *[p for p in (stage, trial if stage else None) if p])
    if fs.get_file_info(path).type != pafs.FileType.Directory:
        return None
    # only finished shards: *.parquet, not hidden temporaries, not other files (config.json)
    files = sorted(
        info.path for info in fs.get_file_info(pafs.FileSelector(path, recursive=True))
        if info.type == pafs.FileType.File and info.base_name.endswith(".parquet") and not info.base_name.startswith(".")
    )
    if not files:
        return None
    import pyarrow.dataset as ds  # pulls in pandas: not on every trial's start-up path

    dataset = ds.dataset(files, filesystem=fs, format="parquet", schema=SCHEMAS[name])
    for fragment in dataset.get_fragments():
        check_schema(name, fragment.physical_schema, fragment.path)
    return dataset


def read_table(results: str, sweep: str, name: str, stage: str | None = None,
               trial: str | None = None) -> pa.Table | None:
    dataset = shard_dataset(results, sweep, name, stage, trial)
    return None if dataset is None else dataset.to_table()


def table_dataset(results: str, sweep: str, name: str):
    """What readers (queries, reports) use for table `name`: for `inputs`, the
    aggregated inputs.parquet when the sweep has one (reward statistics recomputed
    from the samples), else the workers' shards; other tables: their shards."""
    if name == "inputs":
        fs, base = resolve(results)
        aggregated = posixpath.join(base, sweep, "inputs.parquet")
        if fs.get_file_info(aggregated).type == pafs.FileType.File:
            import pyarrow.dataset as ds

            dataset = ds.dataset(aggregated, filesystem=fs, format="parquet", schema=SCHEMAS["inputs"])
            for fragment in dataset.get_fragments():
                check_schema(name, fragment.physical_schema, fragment.path)
            return dataset
    return shard_dataset(results, sweep, name)
