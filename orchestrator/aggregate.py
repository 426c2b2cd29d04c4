"""Shards -> one per-input table for the whole sweep.

<results>/<sweep>/inputs.parquet holds one row per (stage, trial, step, input):
reward mean and std recomputed from the stored per-sample rewards (so the
table is exactly what the `samples` rows say), joined with the gradient norm
each worker measured. It also checks the shards' integrity: every
(trial, input, sample) exactly once, and each input with as many samples as
its worker drew.
"""

from __future__ import annotations

import posixpath
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc

from workloads.tables import INPUTS, SCHEMA_VERSION, resolve, write_parquet_atomic

from .tables_io import read_table

KEYS = ["sweep", "stage", "trial", "config_hash", "step", "input_id"]


class AggregationError(RuntimeError):
    pass


@dataclass
class AggregateSummary:
    path: str | None
    num_samples: int
    num_inputs: int


def per_input_table(samples: pa.Table, worker_inputs: pa.Table | None) -> pa.Table:
    """Group sample rows by input: reward mean, std (1/K and 1/(K-1)), count."""
    counts = samples.group_by(KEYS + ["sample_idx"]).aggregate([("reward", "count")])
    dup = counts.filter(pc.greater(counts["reward_count"], 1))
    if dup.num_rows:
        row = dup.slice(0, 1).to_pylist()[0]
        raise AggregationError(
            f"{dup.num_rows} (input, sample) pairs are stored more than once, e.g. trial {row['trial']} "
            f"input {row['input_id']} sample {row['sample_idx']}"
        )
    grouped = samples.group_by(KEYS).aggregate([
        ("reward", "mean"),
        ("reward", "stddev", pc.VarianceOptions(ddof=0)),
        ("reward", "stddev", pc.VarianceOptions(ddof=1)),
        ("reward", "count"),
        ("prompt", "min"),  # one value per input; min is order-free (threads)
        ("model", "min"),
        ("dataset", "min"),
    ])
    # group_by names the two stddev columns alike; take them by position
    names = grouped.column_names
    std_cols = [i for i, n in enumerate(names) if n == "reward_stddev"]
    columns = {
        **{k: grouped[k] for k in KEYS},
        "prompt": grouped["prompt_min"],
        "num_samples": pc.cast(grouped["reward_count"], pa.int32()),
        "reward_mean": grouped["reward_mean"],
        "reward_std": grouped.column(std_cols[0]),
        "reward_std_unbiased": grouped.column(std_cols[1]),
        "model": grouped["model_min"],
        "dataset": grouped["dataset_min"],
    }
    table = pa.table(columns)
    if worker_inputs is not None and worker_inputs.num_rows:
        measured = worker_inputs.select(KEYS + ["grad_norm", "num_samples"]).rename_columns(KEYS + ["grad_norm", "drawn"])
        table = table.join(measured, keys=KEYS, join_type="left outer")
        mismatch = table.filter(pc.not_equal(table["num_samples"], pc.cast(table["drawn"], pa.int32())))
        if mismatch.num_rows:
            row = mismatch.slice(0, 1).to_pylist()[0]
            raise AggregationError(
                f"trial {row['trial']} input {row['input_id']}: {row['num_samples']} sample rows stored "
                f"but its worker drew {row['drawn']} (lost or duplicated rows)"
            )
    else:
        table = table.append_column("grad_norm", pa.nulls(table.num_rows, pa.float64()))
    table = table.select(INPUTS.names).cast(INPUTS)
    table = table.sort_by([("stage", "ascending"), ("trial", "ascending"), ("step", "ascending"), ("input_id", "ascending")])
    return table.replace_schema_metadata({"rlgrad.table": "inputs", "rlgrad.schema_version": SCHEMA_VERSION})


def aggregate_sweep(results: str, sweep: str) -> AggregateSummary:
    """Write <results>/<sweep>/inputs.parquet from the sweep's shards (if it sampled anything)."""
    samples = read_table(results, sweep, "samples")
    if samples is None or samples.num_rows == 0:
        return AggregateSummary(None, 0, 0)
    table = per_input_table(samples, read_table(results, sweep, "inputs"))
    fs, base = resolve(results)
    path = posixpath.join(base, sweep, "inputs.parquet")
    write_parquet_atomic(fs, path, table)
    uri = path if "://" not in results else f"{results.split('://', 1)[0]}://{path}"
    return AggregateSummary(uri, samples.num_rows, table.num_rows)
