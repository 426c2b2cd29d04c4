"""Where results live: a local directory or any pyarrow filesystem URI (s3://, gs://).

Writes are atomic (temporary file + rename locally, one PUT on object
stores) so a reader never sees half a shard.
"""

from __future__ import annotations

import os
import posixpath
import uuid
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from .tables import SCHEMAS, to_table


def resolve(uri: str) -> tuple[pafs.FileSystem, str]:
    """A pyarrow filesystem and a path in it for a local path or a URI (s3://, gs://, ...)."""
    if "://" not in uri:
        return pafs.LocalFileSystem(), os.path.abspath(uri)
    return pafs.FileSystem.from_uri(uri)


def write_parquet_atomic(fs: pafs.FileSystem, path: str, table: pa.Table) -> None:
    """Write `table` so that readers see either no file or the whole file."""
    fs.create_dir(posixpath.dirname(path), recursive=True)
    if isinstance(fs, pafs.LocalFileSystem):
        tmp = posixpath.join(posixpath.dirname(path), f".{posixpath.basename(path)}.{uuid.uuid4().hex}.tmp")
        pq.write_table(table, tmp, filesystem=fs)
        fs.move(tmp, path)  # rename(2): atomic on one filesystem
    else:
        pq.write_table(table, path, filesystem=fs)  # object stores: one PUT, atomic


@dataclass
class ShardWriter:
    """Writes one trial's shards of any table under <root>/<sweep>/<table>/<stage>/<trial>/."""

    root: str  # results root: local path or URI
    sweep: str
    stage: str
    trial: str
    config_hash: str

    @property
    def identity(self) -> dict[str, str]:
        return {"sweep": self.sweep, "stage": self.stage, "trial": self.trial, "config_hash": self.config_hash}

    def _path(self, table: str, shard: str) -> tuple[pafs.FileSystem, str]:
        if table not in SCHEMAS:
            raise ValueError(f"unknown table {table!r}; allowed: {sorted(SCHEMAS)}")
        fs, base = resolve(self.root)
        return fs, posixpath.join(base, self.sweep, table, self.stage, self.trial, f"{shard}.parquet")

    def exists(self, table: str, shard: str) -> bool:
        fs, path = self._path(table, shard)
        return fs.get_file_info(path).type == pafs.FileType.File

    def read(self, table: str, shard: str, columns: list[str]) -> list[dict]:
        """Rows of a shard this trial wrote (a resumed worker reuses them)."""
        fs, path = self._path(table, shard)
        return pq.read_table(path, filesystem=fs, columns=columns).to_pylist()

    def write(self, table: str, shard: str, rows) -> str:
        fs, path = self._path(table, shard)
        write_parquet_atomic(fs, path, to_table(table, rows, self.identity))
        return path
