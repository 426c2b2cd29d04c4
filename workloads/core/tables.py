"""The Parquet tables rlgrad writes: one schema per table, defined once, versioned.

Layout under a sweep directory (local path or any pyarrow filesystem URI):

    <results>/<sweep>/<table>/<stage>/<trial>/<shard>.parquet

Every row carries sweep, stage, trial and config_hash (the identity columns) so
tables of many sweeps can be unioned and queried together. A shard is written
atomically (temporary file + rename on local disks; a single PUT on object
stores) under a name derived from *what* it holds (for example the input range
``inputs-000256-000511``), never from who wrote it or when: a retried worker
rewrites the same name instead of adding a duplicate, and a resumed one can
skip shards that already exist.

Bump SCHEMA_VERSION on any change to a schema; readers refuse other versions.
"""

from __future__ import annotations

import pyarrow as pa

SCHEMA_VERSION = "4"  # 2: samples gained prompt_token_ids and output_token_ids; 3: inputs.reward_std_zero;
# 4: inputs.update_grad_norm

IDENTITY_FIELDS = [
    pa.field("sweep", pa.string(), nullable=False),
    pa.field("stage", pa.string(), nullable=False),
    pa.field("trial", pa.string(), nullable=False),
    pa.field("config_hash", pa.string(), nullable=False),
]

# One row per (step, input, sample). `step` is the training step of the model
# that drew the sample: 0 for extraction from a fixed model; a PPO run records
# rollouts and before/after evaluations at their steps.
SAMPLES = pa.schema(
    IDENTITY_FIELDS
    + [
        pa.field("step", pa.int64(), nullable=False),
        pa.field("input_id", pa.int64(), nullable=False),
        pa.field("sample_idx", pa.int32(), nullable=False),
        pa.field("prompt", pa.string()),
        pa.field("output", pa.string()),
        pa.field("reward", pa.float64(), nullable=False),
        # name -> value of each reward component (for the built-in task:
        # char_accuracy, length_match); empty when the reward has no parts
        pa.field("reward_components", pa.map_(pa.string(), pa.float64())),
        pa.field("log_prob", pa.float64()),  # log pi(y|x), summed over output tokens
        pa.field("num_tokens", pa.int32()),  # generated tokens, EOS included
        # the exact token ids (the texts drop special tokens): any statistic of a
        # sample -- log-probs, gradient norms -- can be recomputed from the table alone
        pa.field("prompt_token_ids", pa.list_(pa.int32())),
        pa.field("output_token_ids", pa.list_(pa.int32())),  # the sampled tokens, EOS included
        # the model as configured (hub id, directory, builtin:*), or for a stage that
        # starts from an earlier one: "@stage/trial <checkpoint URI>"
        pa.field("model", pa.string()),
        pa.field("dataset", pa.string()),
    ]
)

# One row per (step, input).
INPUTS = pa.schema(
    IDENTITY_FIELDS
    + [
        pa.field("step", pa.int64(), nullable=False),
        pa.field("input_id", pa.int64(), nullable=False),
        pa.field("prompt", pa.string()),
        pa.field("num_samples", pa.int32(), nullable=False),
        pa.field("reward_mean", pa.float64(), nullable=False),
        # population std, 1/K normalisation: sqrt(mean((r - mean)^2))
        pa.field("reward_std", pa.float64(), nullable=False),
        # unbiased sample std, 1/(K-1) normalisation
        pa.field("reward_std_unbiased", pa.float64(), nullable=False),
        # all K rewards equal (std exactly 0): every group-relative advantage is 0 and
        # the gradient norm below is exactly 0 -- the vanishing-gradient case
        pa.field("reward_std_zero", pa.bool_()),
        # || (1/K) sum_k (r_k - b_k) grad log pi(y_k|x) ||_2 with leave-one-out
        # baseline b_k; null when the stage did not compute gradients
        pa.field("grad_norm", pa.float64()),
        # NOT the above: || the gradient of the training loss's terms of this input's K outputs ||_2,
        # i.e. this input's share of the gradient the optimiser step applied (before clipping; GRPO,
        # from the update's own backward, workloads/text/update_grads.py); null where no update ran
        pa.field("update_grad_norm", pa.float64()),
        pa.field("model", pa.string()),  # as in `samples`
        pa.field("dataset", pa.string()),
    ]
)

# Training curves: one row per (step, metric, split).
METRICS = pa.schema(
    IDENTITY_FIELDS
    + [
        pa.field("step", pa.int64(), nullable=False),
        pa.field("metric", pa.string(), nullable=False),
        pa.field("value", pa.float64()),
        # "train", "test", or a group such as "small_reward_std"
        pa.field("split", pa.string(), nullable=False),
    ]
)

# One row per trial, written by the driver.
TRIALS = pa.schema(
    IDENTITY_FIELDS
    + [
        pa.field("workload", pa.string(), nullable=False),
        pa.field("params", pa.string()),  # JSON of the searched parameters
        pa.field("config", pa.string()),  # JSON of the full resolved config
        pa.field("parent_trial", pa.string()),  # the trial a from_stage reference used
        pa.field("status", pa.string()),  # TERMINATED / ERROR
        pa.field("checkpoint", pa.string()),  # URI of the final checkpoint, if any
        pa.field("metrics", pa.string()),  # JSON of the last reported metrics
    ]
)

SCHEMAS: dict[str, pa.Schema] = {
    "samples": SAMPLES,
    "inputs": INPUTS,
    "metrics": METRICS,
    "trials": TRIALS,
}


def _with_version(schema: pa.Schema, name: str) -> pa.Schema:
    return schema.with_metadata({b"rlgrad.table": name.encode(), b"rlgrad.schema_version": SCHEMA_VERSION.encode()})


def to_table(name: str, rows, identity: dict[str, str] | None = None) -> pa.Table:
    """Build a table of schema `name` from a dict of columns or a list of row dicts.

    `identity` (sweep/stage/trial/config_hash) is broadcast to every row.
    Missing nullable columns are filled with nulls; extra columns are an error.
    """
    schema = SCHEMAS[name]
    if isinstance(rows, pa.Table):
        columns = {c: rows.column(c).to_pylist() for c in rows.column_names}
    elif isinstance(rows, dict):
        columns = {k: list(v) for k, v in rows.items()}
    else:
        rows = list(rows)
        columns = {k: [r.get(k) for r in rows] for k in (rows[0].keys() if rows else [])}
    n = len(next(iter(columns.values()))) if columns else 0
    for key, value in (identity or {}).items():
        columns[key] = [value] * n
    unknown = set(columns) - set(schema.names)
    if unknown:
        raise ValueError(f"table {name!r}: unknown columns {sorted(unknown)}; allowed: {schema.names}")
    arrays = []
    for field in schema:
        values = columns.get(field.name, [None] * n)
        if len(values) != n:
            raise ValueError(f"table {name!r}: column {field.name!r} has {len(values)} values, expected {n}")
        arrays.append(pa.array(values, type=field.type))
    table = pa.Table.from_arrays(arrays, schema=schema)
    table.validate(full=True)
    for field in schema:
        if not field.nullable and table.column(field.name).null_count:
            raise ValueError(f"table {name!r}: column {field.name!r} must not be null")
    return table.replace_schema_metadata(_with_version(schema, name).metadata)


def check_schema(name: str, schema: pa.Schema, where: str) -> None:
    """Refuse a file written under another schema version or with other columns."""
    meta = schema.metadata or {}
    version = meta.get(b"rlgrad.schema_version", b"?").decode()
    if version != SCHEMA_VERSION:
        raise ValueError(f"{where}: table {name!r} has schema version {version}, this rlgrad reads {SCHEMA_VERSION}")
    expected = SCHEMAS[name]
    if not schema.remove_metadata().equals(expected):
        raise ValueError(f"{where}: table {name!r} does not match the rlgrad schema v{SCHEMA_VERSION}")
