"""Shards -> one per-input table for the whole sweep.

<results>/<sweep>/inputs.parquet holds one row per (stage, trial, step, input):
reward mean and std recomputed from the stored per-sample rewards (so the
table is exactly what the `samples` rows say), joined with the gradient norm
each worker measured. It also checks the shards' integrity: every
(trial, input, sample) exactly once, and each input with as many samples as
its worker drew.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from workloads.core.storage import ResultsRoot
from workloads.core.tables import INPUTS, SCHEMA_VERSION

KEYS = ["sweep", "stage", "trial", "config_hash", "step", "input_id"]


class AggregationError(RuntimeError):
    pass


@dataclass
class AggregateSummary:
    path: str | None
    num_samples: int
    num_inputs: int


def _segment_stats(keys: list[np.ndarray], sample_idx: np.ndarray, reward: np.ndarray) -> dict[str, np.ndarray] | None:
    """Per-group statistics of rows already sorted by (keys..., sample_idx), in
    O(rows) without hashing: group boundaries are where a key changes, and
    np.*.reduceat reduces each run. None if the rows are not sorted.

    The std is two-pass (mean first, then squared deviations) as numpy's is,
    so small stds of large rewards keep their precision."""
    n = len(reward)
    # lexicographic order check: each row >= the one before it
    greater = np.zeros(n - 1, dtype=bool)
    equal = np.ones(n - 1, dtype=bool)
    for column in [*keys, sample_idx]:
        a, b = column[:-1], column[1:]
        greater |= equal & (b > a)
        equal &= b == a
    if not (greater | equal).all():
        return None
    change = np.ones(n, dtype=bool)
    change[1:] = np.logical_or.reduce([k[1:] != k[:-1] for k in keys])
    starts = np.flatnonzero(change)
    count = np.diff(np.append(starts, n))
    mean = np.add.reduceat(reward, starts) / count
    deviation = reward - np.repeat(mean, count)
    squares = np.add.reduceat(deviation * deviation, starts)
    # K equal rewards have std exactly 0 (the mean of 8 x 0.1 is 0.09999999999999999, which
    # would leave 1e-17), as workloads.text.gradnorm.reward_stats says on the workers
    squares[np.maximum.reduceat(reward, starts) == np.minimum.reduceat(reward, starts)] = 0.0
    with np.errstate(invalid="ignore", divide="ignore"):
        std_unbiased = np.sqrt(squares / (count - 1))
    return {
        **{f"key{i}": k[starts] for i, k in enumerate(keys)},
        "count": count, "mean": mean, "std": np.sqrt(squares / count), "std_unbiased": std_unbiased,
        "idx_min": np.minimum.reduceat(sample_idx, starts), "idx_max": np.maximum.reduceat(sample_idx, starts),
        "idx_sum": np.add.reduceat(sample_idx.astype(np.int64), starts),
    }


def _hash_stats(keyed: pa.Table, int_keys: list[str]) -> dict[str, np.ndarray]:
    """The same statistics for rows in any order: one hash group-by."""
    grouped = keyed.group_by(int_keys).aggregate([
        ("reward", "mean"), ("reward", "stddev", pc.VarianceOptions(ddof=0)),
        ("reward", "stddev", pc.VarianceOptions(ddof=1)), ("reward", "count"),
        ("sample_idx", "min"), ("sample_idx", "max"), ("sample_idx", "sum"), ("reward", "min_max"),
    ])
    grouped = grouped.sort_by([(k, "ascending") for k in int_keys])
    std_cols = [i for i, n in enumerate(grouped.column_names) if n == "reward_stddev"]
    as_np = lambda c: c.to_numpy(zero_copy_only=False)  # noqa: E731
    equal = (pc.struct_field(grouped["reward_min_max"], "min").to_numpy(zero_copy_only=False)
             == pc.struct_field(grouped["reward_min_max"], "max").to_numpy(zero_copy_only=False))
    return {
        **{f"key{i}": as_np(grouped[k]) for i, k in enumerate(int_keys)},
        "count": as_np(grouped["reward_count"]), "mean": as_np(grouped["reward_mean"]),
        "std": np.where(equal, 0.0, as_np(grouped.column(std_cols[0]))),
        "std_unbiased": np.where(equal, 0.0, np.nan_to_num(as_np(grouped.column(std_cols[1])), nan=np.nan)),
        "idx_min": as_np(grouped["sample_idx_min"]), "idx_max": as_np(grouped["sample_idx_max"]),
        "idx_sum": as_np(grouped["sample_idx_sum"]),
    }


def per_input_table(samples: pa.Table, worker_inputs: pa.Table | None) -> pa.Table:
    """Group sample rows by input: reward mean, std (1/K and 1/(K-1)), count.

    Keys are integers: each trial id becomes its rank among the sorted trial
    ids, so groups are (trial_rank, step, input_id). Workers write shards in
    input order, so the rows usually arrive sorted and the statistics are a
    segmented scan (_segment_stats); otherwise one hash group-by (_hash_stats).
    Integrity: an input's stored sample_idx values must be exactly 0..K-1 with
    K the number its worker drew (count, min, max and sum agree), so a
    duplicated or a lost sample is caught. Per-input strings (prompt, model,
    dataset) and the gradient norm come from the workers' `inputs` rows.
    """
    trial = pc.dictionary_encode(samples["trial"]).combine_chunks()
    names = trial.dictionary.to_pylist()
    sorted_names = sorted(names)
    rank_of = np.array([sorted_names.index(n) for n in names], dtype=np.int64)
    trial_rank = rank_of[trial.indices.to_numpy(zero_copy_only=False)]
    step = samples["step"].to_numpy()
    input_id = samples["input_id"].to_numpy()
    sample_idx = samples["sample_idx"].to_numpy()
    reward = samples["reward"].to_numpy()
    stats = _segment_stats([trial_rank, step, input_id], sample_idx, reward)
    if stats is None:
        keyed = pa.table({"trial_rank": trial_rank, "step": step, "input_id": input_id,
                          "sample_idx": sample_idx, "reward": reward})
        stats = _hash_stats(keyed, ["trial_rank", "step", "input_id"])
    group_rank, group_step, group_input, count = stats["key0"], stats["key1"], stats["key2"], stats["count"]

    # sample_idx must be exactly 0..count-1: min 0, max count-1, sum count(count-1)/2
    bad = (stats["idx_min"] != 0) | (stats["idx_max"] != count - 1) | (2 * stats["idx_sum"] != count * (count - 1))
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise AggregationError(
            f"{int(bad.sum())} inputs have lost or duplicated sample rows (their sample_idx are not exactly "
            f"0..K-1), e.g. trial {sorted_names[group_rank[i]]} input {group_input[i]} ({count[i]} rows)"
        )

    columns: dict[str, object] = {}
    if worker_inputs is not None and worker_inputs.num_rows:
        # align the workers' rows with the groups: both sorted by the same integer keys
        w_rank = pc.index_in(worker_inputs["trial"], pa.array(sorted_names)).to_numpy(zero_copy_only=False)
        order = np.lexsort((worker_inputs["input_id"].to_numpy(), worker_inputs["step"].to_numpy(), w_rank))
        w = worker_inputs.take(pa.array(order))
        same = (len(w) == len(count) and np.array_equal(w_rank[order], group_rank)
                and np.array_equal(w["step"].to_numpy(), group_step)
                and np.array_equal(w["input_id"].to_numpy(), group_input))
        drawn = w["num_samples"].to_numpy() if same else None
        if not same or not np.array_equal(drawn, count):
            raise AggregationError(
                f"{len(count)} inputs have sample rows but workers recorded {len(w)} inputs"
                if not same else
                f"{int((drawn != count).sum())} inputs have a number of sample rows other than the number their "
                f"worker drew (lost or duplicated rows), e.g. trial {sorted_names[group_rank[np.argmax(drawn != count)]]}"
            )
        columns.update(prompt=w["prompt"], grad_norm=w["grad_norm"], update_grad_norm=w["update_grad_norm"],
                       model=w["model"], dataset=w["dataset"],
                       # the worker's verdict, under its config's zero_std_tolerance (recomputed where absent)
                       reward_std_zero=pc.fill_null(w["reward_std_zero"], pa.array(stats["std"] == 0)))
    else:  # no per-input rows from the workers: take the strings at each group's first sample row
        firsts = pc.sort_indices(pa.table({"r": trial_rank, "s": step, "i": input_id, "k": sample_idx}),
                                 sort_keys=[("r", "ascending"), ("s", "ascending"), ("i", "ascending"), ("k", "ascending")])
        firsts = firsts.take(pa.array(np.concatenate([[0], np.cumsum(count)[:-1]])))
        columns.update(prompt=samples["prompt"].take(firsts), grad_norm=pa.nulls(len(count), pa.float64()),
                       update_grad_norm=pa.nulls(len(count), pa.float64()),
                       model=samples["model"].take(firsts), dataset=samples["dataset"].take(firsts))

    # identity columns of each trial, read at its first sample row
    identity = []
    for name in sorted_names:
        at = pc.index(samples["trial"], name).as_py()
        identity.append({"trial": name, **{k: samples[k][at].as_py() for k in ("sweep", "stage", "config_hash")}})
    ranks = pa.array(group_rank)
    for k in ("sweep", "stage", "trial", "config_hash"):
        columns[k] = pc.take(pa.array([row[k] for row in identity], pa.string()), ranks)
    columns.update(step=group_step, input_id=group_input, num_samples=count.astype(np.int32),
                   reward_mean=stats["mean"], reward_std=stats["std"], reward_std_unbiased=stats["std_unbiased"],
                   **({} if "reward_std_zero" in columns else {"reward_std_zero": stats["std"] == 0}))
    table = pa.table({name: columns[name] for name in INPUTS.names}).cast(INPUTS)
    return table.replace_schema_metadata({"rlgrad.table": "inputs", "rlgrad.schema_version": SCHEMA_VERSION})


def aggregate_sweep(results: str, sweep: str) -> AggregateSummary:
    """Write <results>/<sweep>/inputs.parquet from the sweep's shards (if it sampled anything)."""
    root = ResultsRoot(results)
    samples = root.read_table(sweep, "samples")
    if samples is None or samples.num_rows == 0:
        return AggregateSummary(None, 0, 0)
    table = per_input_table(samples, root.read_table(sweep, "inputs"))
    uri = root.write_parquet(sweep, "inputs.parquet", table=table)
    return AggregateSummary(uri, samples.num_rows, table.num_rows)
