"""Aggregating sample rows into the per-input table: rlgrad's pyarrow path
(orchestrator.aggregate.per_input_table) vs a pandas groupby doing the same work
(duplicate check, mean / std 1/K / std 1/(K-1) / count / prompt per input, join
with the workers' gradient norms, check of the sample counts).

Each method runs in a fresh subprocess so its peak resident memory (ru_maxrss)
is its own; the input table is built once and read from a Parquet file by both.

    python benchmarks/bench_aggregate.py                 # 10M sample rows (1.25M inputs x K=8), 3 repeats
    python benchmarks/bench_aggregate.py --rows 1000000 --repeats 5
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

K = 8


def make_tables(num_rows: int, directory: str) -> tuple[str, str]:
    """A samples table of num_rows rows (4 trials, K samples per input) and the workers' inputs table."""
    from workloads.core.tables import INPUTS, SAMPLES

    rng = np.random.default_rng(0)
    num_inputs = num_rows // K
    per_trial = num_inputs // 4
    trial_of_input = np.repeat(np.arange(4), per_trial)[:num_inputs]
    input_id = np.tile(np.arange(per_trial), 4)[:num_inputs]
    trials = np.array([f"extract-{i:010d}" for i in range(4)], dtype=object)
    prompts = pa.array([f"prompt number {i} of the task" for i in range(per_trial)])

    rows = num_inputs * K
    row_input = np.repeat(np.arange(num_inputs), K)
    trial_idx = trial_of_input[row_input]
    samples = pa.table({
        "sweep": pa.DictionaryArray.from_arrays(np.zeros(rows, np.int32), ["bench"]).cast(pa.string()),
        "stage": pa.DictionaryArray.from_arrays(np.zeros(rows, np.int32), ["extract"]).cast(pa.string()),
        "trial": pa.DictionaryArray.from_arrays(trial_idx.astype(np.int32), list(trials)).cast(pa.string()),
        "config_hash": pa.DictionaryArray.from_arrays(trial_idx.astype(np.int32), [f"h{i:015d}" for i in range(4)]).cast(pa.string()),
        "step": pa.array(np.zeros(rows, np.int64)),
        "input_id": pa.array(input_id[row_input].astype(np.int64)),
        "sample_idx": pa.array(np.tile(np.arange(K, dtype=np.int32), num_inputs)),
        "prompt": prompts.take(pa.array(input_id[row_input])),
        "output": pa.array(["a sampled output"] * rows),
        "reward": pa.array(rng.random(rows) * (rng.random(rows) > 0.3)),
        "reward_components": pa.array([[]] * rows, type=pa.map_(pa.string(), pa.float64())),
        "log_prob": pa.array(-rng.random(rows) * 20),
        "num_tokens": pa.array(rng.integers(1, 48, rows).astype(np.int32)),
        "prompt_token_ids": pa.nulls(rows, pa.list_(pa.int32())),
        "output_token_ids": pa.nulls(rows, pa.list_(pa.int32())),
        "model": pa.array(["builtin:tiny-gpt2"] * rows),
        "dataset": pa.array(["reverse"] * rows),
    }).cast(SAMPLES)
    inputs = pa.table({
        "sweep": pa.array(["bench"] * num_inputs), "stage": pa.array(["extract"] * num_inputs),
        "trial": pa.array(trials[trial_of_input].tolist()),
        "config_hash": pa.array([f"h{i:015d}" for i in trial_of_input]),
        "step": pa.array(np.zeros(num_inputs, np.int64)), "input_id": pa.array(input_id.astype(np.int64)),
        "prompt": prompts.take(pa.array(input_id)), "num_samples": pa.array(np.full(num_inputs, K, np.int32)),
        "reward_mean": pa.array(np.zeros(num_inputs)), "reward_std": pa.array(np.zeros(num_inputs)),
        "reward_std_unbiased": pa.array(np.zeros(num_inputs)), "grad_norm": pa.array(rng.random(num_inputs)),
        "model": pa.array(["builtin:tiny-gpt2"] * num_inputs), "dataset": pa.array(["reverse"] * num_inputs),
    }).cast(INPUTS)
    samples_path, inputs_path = os.path.join(directory, "samples.parquet"), os.path.join(directory, "inputs.parquet")
    pq.write_table(samples, samples_path)
    pq.write_table(inputs, inputs_path)
    return samples_path, inputs_path


def run_rlgrad(samples_path: str, inputs_path: str) -> tuple[float, int]:
    from orchestrator.aggregate import per_input_table

    samples, inputs = pq.read_table(samples_path), pq.read_table(inputs_path)
    start = time.perf_counter()
    table = per_input_table(samples, inputs)
    return time.perf_counter() - start, table.num_rows


def run_pandas(samples_path: str, inputs_path: str) -> tuple[float, int]:
    samples = pq.read_table(samples_path).to_pandas()
    inputs = pq.read_table(inputs_path).to_pandas()
    keys = ["sweep", "stage", "trial", "config_hash", "step", "input_id"]
    start = time.perf_counter()
    if samples.duplicated(keys + ["sample_idx"]).any():
        raise RuntimeError("duplicates")
    grouped = samples.groupby(keys, sort=False).agg(
        reward_mean=("reward", "mean"),
        reward_std=("reward", "std"),
        num_samples=("reward", "count"),
        prompt=("prompt", "first"),
        model=("model", "first"),
        dataset=("dataset", "first"),
    )
    # pandas' std is 1/(K-1); the 1/K form from the same variance
    grouped["reward_std_unbiased"] = grouped["reward_std"]
    k = grouped["num_samples"]
    grouped["reward_std"] = grouped["reward_std_unbiased"] * np.sqrt((k - 1) / k)
    table = grouped.reset_index().merge(inputs[keys + ["grad_norm", "num_samples"]].rename(columns={"num_samples": "drawn"}),
                                        on=keys, how="left")
    if (table["num_samples"] != table["drawn"]).any():
        raise RuntimeError("lost rows")
    table = table.sort_values(["stage", "trial", "step", "input_id"])
    return time.perf_counter() - start, len(table)


def _child(method: str, samples_path: str, inputs_path: str) -> None:
    run = {"rlgrad": run_rlgrad, "pandas": run_pandas}[method]
    # warm up on a small copy (thread pools, lazily initialised kernels), then time the real thing
    with tempfile.TemporaryDirectory() as tmp:
        small = [os.path.join(tmp, "s.parquet"), os.path.join(tmp, "i.parquet")]
        pq.write_table(pq.read_table(samples_path).slice(0, 8 * 1000), small[0])
        pq.write_table(pq.read_table(inputs_path).slice(0, 1000), small[1])
        run(*small)
    seconds, rows = run(samples_path, inputs_path)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"seconds": seconds, "rows": rows, "peak_mb": peak_mb}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=10_000_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _child(*args.child)
        return
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        samples_path, inputs_path = make_tables(args.rows, tmp)
        print(f"built {args.rows:,} sample rows in {time.perf_counter() - t:.1f}s", flush=True)
        results: dict[str, list[dict]] = {"rlgrad": [], "pandas": []}
        for _ in range(args.repeats):
            for method in results:  # interleaved, so both see the same machine load
                out = subprocess.run([sys.executable, __file__, "--child", method, samples_path, inputs_path],
                                     capture_output=True, text=True, check=True)
                results[method].append(json.loads(out.stdout.strip().splitlines()[-1]))
    rows = {m: r[0]["rows"] for m, r in results.items()}
    assert rows["rlgrad"] == rows["pandas"], rows
    print(f"\naggregate {args.rows:,} sample rows -> {rows['rlgrad']:,} input rows; {args.repeats} runs each, "
          f"{os.cpu_count()} cores")
    print(f"{'method':<28}{'median s':>10}{'min-max s':>16}{'peak MB':>10}")
    med = {}
    for method, label in (("rlgrad", "rlgrad (segmented scan)"), ("pandas", "pandas groupby")):
        secs = [r["seconds"] for r in results[method]]
        med[method] = statistics.median(secs)
        peak = max(r["peak_mb"] for r in results[method])
        print(f"{label:<28}{med[method]:>10.2f}{f'{min(secs):.2f}-{max(secs):.2f}':>16}{peak:>10.0f}")
    print(f"ratio pandas / rlgrad: {med['pandas'] / med['rlgrad']:.1f}x")


if __name__ == "__main__":
    main()
