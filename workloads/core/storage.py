"""Where results live: one `ResultsRoot`, a local directory or any pyarrow
filesystem URI (s3://, gs://), owns every read and write under it.

    root = ResultsRoot("results")            # or ResultsRoot("s3://bucket/prefix")
    root.check_writable()                    # the probe: one line when it cannot be written
    with root.sweep_lock("quickstart"): ...  # one driver per sweep (local roots)
    trial = root.trial_storage(sweep, stage, trial_id, config_hash)
    trial.write("samples", "inputs-000000-000255", rows)      # a workload's shards
    root.read_table(sweep, "samples")        # every shard of a table, schema-checked

Layout (see docs/architecture.md):

    <root>/<sweep>/sweep.yaml, inputs.parquet, report.html
    <root>/<sweep>/<table>/<stage>/<trial>/<shard>.parquet
    <root>/<sweep>/trials/<stage>/<trial>/config.json, last_metrics.json, workers/
    <root>/<sweep>/checkpoints/<stage>/...  and  <root>/<sweep>/_tune/ (Ray's own)

Writes are atomic (temporary file + rename locally, one PUT on object stores)
so a reader never sees half a file. This module imports neither Ray nor torch:
workloads write through it and the orchestrator reads through it.
"""

from __future__ import annotations

import os
import posixpath
import time
import uuid
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from .tables import SCHEMAS, check_schema, to_table


class ResultsRootError(ValueError):
    """The results root cannot be used (unwritable, or a sweep held by another driver); one line."""


def _check_table_name(table: str) -> None:
    if table not in SCHEMAS:
        raise ValueError(f"unknown table {table!r}; allowed: {sorted(SCHEMAS)}")


def _first_line(error: Exception) -> str:
    return str(error).splitlines()[0] if str(error) else type(error).__name__


class ResultsRoot:
    """A results root. `location` is an absolute local path or the URI as given;
    its pyarrow filesystem is resolved once, on first use (so building a root
    never fails, and a root pickles as its location to Ray workers, which
    resolve it with their own credentials)."""

    def __init__(self, location: str):
        self.is_local = "://" not in location
        self.location = os.path.abspath(location) if self.is_local else location
        self._resolved: tuple[pafs.FileSystem, str] | None = None

    def __reduce__(self):
        return (ResultsRoot, (self.location,))

    def __repr__(self) -> str:
        return f"ResultsRoot({self.location!r})"

    # ------------------------------------------------------------ where things are

    @property
    def fs(self) -> pafs.FileSystem:
        return self._resolve()[0]

    def _resolve(self) -> tuple[pafs.FileSystem, str]:
        if self._resolved is None:
            if self.is_local:
                self._resolved = (pafs.LocalFileSystem(), self.location)
            else:
                self._resolved = pafs.FileSystem.from_uri(self.location)
        return self._resolved

    def path(self, *parts: str) -> str:
        """The path of <root>/<parts...> inside `fs`."""
        return posixpath.join(self._resolve()[1], *parts)

    def uri(self, *parts: str) -> str:
        """<root>/<parts...> as users and Ray name it: an absolute path or a URI."""
        return posixpath.join(self.location, *parts)

    def uri_of(self, path: str) -> str:
        """The URI of a path inside `fs` (a checkpoint path Ray reports, say)."""
        if self.is_local:
            return path
        return f"{self.location.split('://', 1)[0]}://{path}"

    def table_path(self, sweep: str, table: str, stage: str | None = None, trial: str | None = None) -> str:
        """<sweep>/<table>[/<stage>[/<trial>]] inside `fs`."""
        _check_table_name(table)
        return self.path(sweep, table, *[p for p in (stage, trial if stage else None) if p])

    def is_file(self, *parts: str) -> bool:
        return self.fs.get_file_info(self.path(*parts)).type == pafs.FileType.File

    # ------------------------------------------------------------ small files

    def write_text(self, *parts: str, text: str) -> None:
        path = self.path(*parts)
        self.fs.create_dir(posixpath.dirname(path), recursive=True)
        with self.fs.open_output_stream(path) as f:
            f.write(text.encode())

    def read_text(self, *parts: str) -> str | None:
        """The file's text, or None when there is no such file."""
        if not self.is_file(*parts):
            return None
        with self.fs.open_input_stream(self.path(*parts)) as f:
            return f.read().decode()

    def check_writable(self) -> None:
        """The write probe: fail early, in one line, when the root cannot be written."""
        probe = f".rlgrad-probe-{uuid.uuid4().hex}"
        try:
            self.write_text(probe, text="probe")
            self.fs.delete_file(self.path(probe))
        except Exception as e:  # pyarrow raises OSError, ValueError, ArrowInvalid... for the many ways storage fails
            raise ResultsRootError(f"cannot write results to {self.location}: {_first_line(e)}") from None

    def sweep_lock(self, sweep: str) -> SweepLock:
        return SweepLock(self.path(sweep) if self.is_local else None)

    def sweeps(self) -> list[str]:
        """Names of the sweeps under the root (directories holding sweep.yaml)."""
        if self.fs.get_file_info(self.path()).type != pafs.FileType.Directory:
            return []
        return sorted(entry.base_name for entry in self.fs.get_file_info(pafs.FileSelector(self.path()))
                      if entry.type == pafs.FileType.Directory and self.is_file(entry.base_name, "sweep.yaml"))

    # ------------------------------------------------------------ Parquet

    def write_parquet(self, *parts: str, table: pa.Table) -> str:
        """Write `table` at <root>/<parts...> so that readers see either no file or the
        whole file; returns its URI."""
        path = self.path(*parts)
        self.fs.create_dir(posixpath.dirname(path), recursive=True)
        if isinstance(self.fs, pafs.LocalFileSystem):
            tmp = posixpath.join(posixpath.dirname(path), f".{posixpath.basename(path)}.{uuid.uuid4().hex}.tmp")
            pq.write_table(table, tmp, filesystem=self.fs)
            self.fs.move(tmp, path)  # rename(2): atomic on one filesystem
        else:
            pq.write_table(table, path, filesystem=self.fs)  # object stores: one PUT, atomic
        return self.uri(*parts)

    def shard_dataset(self, sweep: str, table: str, stage: str | None = None, trial: str | None = None):
        """A lazy dataset over all shards of `table` (of one stage / trial if given), or None."""
        path = self.table_path(sweep, table, stage, trial)
        if self.fs.get_file_info(path).type != pafs.FileType.Directory:
            return None
        # only finished shards: *.parquet, not hidden temporaries, not other files (config.json)
        files = sorted(
            info.path for info in self.fs.get_file_info(pafs.FileSelector(path, recursive=True))
            if info.type == pafs.FileType.File and info.base_name.endswith(".parquet")
            and not info.base_name.startswith(".")
        )
        return self._checked_dataset(table, files) if files else None

    def read_table(self, sweep: str, table: str, stage: str | None = None,
                   trial: str | None = None) -> pa.Table | None:
        """Every shard of `table` unioned (of one stage / trial if given), or None."""
        dataset = self.shard_dataset(sweep, table, stage, trial)
        return None if dataset is None else dataset.to_table()

    def table_dataset(self, sweep: str, table: str):
        """What readers (queries, reports) use for `table`: for `inputs`, the
        aggregated inputs.parquet when the sweep has one (reward statistics
        recomputed from the samples), else the workers' shards; other tables:
        their shards."""
        if table == "inputs" and self.is_file(sweep, "inputs.parquet"):
            return self._checked_dataset(table, self.path(sweep, "inputs.parquet"))
        return self.shard_dataset(sweep, table)

    def _checked_dataset(self, table: str, files):
        import pyarrow.dataset as ds  # pulls in pandas: not on every trial's start-up path

        dataset = ds.dataset(files, filesystem=self.fs, format="parquet", schema=SCHEMAS[table])
        for fragment in dataset.get_fragments():
            check_schema(table, fragment.physical_schema, fragment.path)
        return dataset

    # ------------------------------------------------------------ one trial

    def trial_storage(self, sweep: str, stage: str, trial: str, config_hash: str) -> TrialStorage:
        return TrialStorage(self, sweep, stage, trial, config_hash)


@dataclass(frozen=True)
class TrialStorage:
    """One trial's view of a results root: its shards of every table under
    <sweep>/<table>/<stage>/<trial>/, and its small files (config.json,
    last_metrics.json, workers/) beside its row of the trials table."""

    root: ResultsRoot
    sweep: str
    stage: str
    trial: str
    config_hash: str

    @property
    def identity(self) -> dict[str, str]:
        return {"sweep": self.sweep, "stage": self.stage, "trial": self.trial, "config_hash": self.config_hash}

    def _shard(self, table: str, shard: str) -> tuple[str, ...]:
        _check_table_name(table)
        return (self.sweep, table, self.stage, self.trial, f"{shard}.parquet")

    def exists(self, table: str, shard: str) -> bool:
        return self.root.is_file(*self._shard(table, shard))

    def write(self, table: str, shard: str, rows) -> str:
        """Write rows of `table` as one shard, atomically; returns its URI."""
        return self.root.write_parquet(*self._shard(table, shard), table=to_table(table, rows, self.identity))

    def read(self, table: str, shard: str, columns: list[str]) -> list[dict]:
        """Rows of a shard this trial wrote (a resumed worker reuses them)."""
        path = self.root.path(*self._shard(table, shard))
        return pq.read_table(path, filesystem=self.root.fs, columns=columns).to_pylist()

    def write_samples_and_inputs(self, shard: str, sample_rows, input_rows) -> None:
        """One shard of sampled inputs: `samples` first, then `inputs`, whose file marks the
        shard done (a worker killed between the two leaves a shard that is written again)."""
        self.write("samples", shard, sample_rows)
        self.write("inputs", shard, input_rows)

    def written_inputs(self, shard: str, columns: list[str]) -> list[dict] | None:
        """The `inputs` rows of a shard a previous attempt finished (a retry reuses them), or None."""
        return self.read("inputs", shard, columns) if self.exists("inputs", shard) else None

    def read_table(self, table: str) -> pa.Table | None:
        """All of this trial's shards of `table` (every worker's), or None."""
        return self.root.read_table(self.sweep, table, self.stage, self.trial)

    def write_text(self, name: str, text: str) -> None:
        self.root.write_text(self.sweep, "trials", self.stage, self.trial, name, text=text)

    def read_text(self, name: str) -> str | None:
        return self.root.read_text(self.sweep, "trials", self.stage, self.trial, name)


class SweepLock:
    """One driver per sweep directory at a time: `<sweep>/.driver.lock`, created
    with O_EXCL and holding the driver's pid; a lock whose pid is dead is taken
    over. Object stores have no exclusive create: there (sweep_dir None) the
    lock holds nothing (docs/architecture.md)."""

    def __init__(self, sweep_dir: str | None):
        self.path = os.path.join(sweep_dir, ".driver.lock") if sweep_dir is not None else None
        self.held = False

    def __enter__(self) -> SweepLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def acquire(self) -> None:
        if self.path is None:
            return
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                try:
                    pid = int(open(self.path).read().split()[0])
                    os.kill(pid, 0)
                except (ValueError, IndexError, ProcessLookupError, FileNotFoundError):
                    os.unlink(self.path)  # left by a driver that died: take over
                    continue
                except PermissionError:
                    pass  # alive, owned by another user
                raise ResultsRootError(f"sweep directory {os.path.dirname(self.path)} is in use by another rlgrad "
                                       f"run (pid {pid}); wait for it or give this sweep another name") from None
            with os.fdopen(fd, "w") as f:
                f.write(f"{os.getpid()} {time.time():.0f}\n")
            self.held = True
            return

    def release(self) -> None:
        if self.held and self.path and os.path.exists(self.path):
            os.unlink(self.path)
        self.held = False
