"""SQL over a results root with DuckDB.

Views: `samples`, `inputs` (the aggregated inputs.parquet where a sweep has
one, else its worker shards), `metrics`, `trials` -- each the union over the
chosen sweeps (every sweep under the root by default). Tables are opened as
pyarrow datasets, so local paths and s3:// roots work the same way, and
DuckDB pushes column selection and filters down into the Parquet scan.
"""

from __future__ import annotations

import duckdb
import pyarrow.dataset as ds

from workloads.core.storage import ResultsRoot
from workloads.core.tables import SCHEMAS


def list_sweeps(results: str) -> list[str]:
    """Names of the sweeps under a results root (directories holding sweep.yaml)."""
    return ResultsRoot(results).sweeps()


def connect(results: str, sweeps: list[str] | None = None) -> duckdb.DuckDBPyConnection:
    """A DuckDB connection with the four views registered."""
    root = ResultsRoot(results)
    chosen = sweeps or root.sweeps()
    known = set(root.sweeps())
    for sweep in chosen:
        if sweep not in known:
            raise ValueError(f"no sweep named {sweep!r} under {results}; sweeps there: {', '.join(sorted(known)) or 'none'}")
    con = duckdb.connect()
    for name in ("samples", "inputs", "metrics", "trials"):
        parts = [d for d in (root.table_dataset(s, name) for s in chosen) if d is not None]
        dataset = ds.dataset(parts) if parts else SCHEMAS[name].empty_table()
        con.register(name, dataset)
    return con


def run_query(results: str, sql: str, sweeps: list[str] | None = None):
    """Run `sql`; returns a pyarrow Table."""
    con = connect(results, sweeps)
    try:
        relation = con.sql(sql)
        return None if relation is None else relation.to_arrow_table()
    except duckdb.Error as e:
        raise ValueError(f"query failed: {str(e).splitlines()[0]}") from None
