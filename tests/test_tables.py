"""Shards, aggregation, queries and the report on hand-made tables (no Ray, no model)."""

import json
import os
import re

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from orchestrator.aggregate import AggregationError, aggregate_sweep, per_input_table
from orchestrator.query import list_sweeps, run_query
from orchestrator.report import build_report, fit_envelope
from workloads.core.storage import ResultsRoot
from workloads.core.tables import SCHEMAS, to_table


def _write_trial(results, sweep, trial, rewards_by_input, grad_norms=None, stage="extract", parent=None):
    writer = ResultsRoot(str(results)).trial_storage(sweep, stage, trial, "hash-" + trial)
    samples, inputs = [], []
    for input_id, rewards in rewards_by_input.items():
        for k, r in enumerate(rewards):
            samples.append({"step": 0, "input_id": input_id, "sample_idx": k, "prompt": f"p{input_id}", "output": "o",
                            "reward": float(r), "reward_components": {"a": float(r)}, "log_prob": -1.0,
                            "num_tokens": 3, "model": "m", "dataset": "d"})
        inputs.append({"step": 0, "input_id": input_id, "prompt": f"p{input_id}", "num_samples": len(rewards),
                       "reward_mean": float(np.mean(rewards)), "reward_std": float(np.std(rewards)),
                       "reward_std_unbiased": float(np.std(rewards, ddof=1)),
                       "grad_norm": None if grad_norms is None else grad_norms[input_id], "model": "m", "dataset": "d"})
    writer.write("samples", "inputs-000000-000099", samples)
    writer.write("inputs", "inputs-000000-000099", inputs)
    writer.write("trials", "trial", [{"workload": stage, "params": json.dumps({"x": trial}), "config": "{}",
                                      "parent_trial": parent, "status": "TERMINATED", "checkpoint": None,
                                      "metrics": json.dumps({"loss": 0.5})}])
    (results / sweep).mkdir(exist_ok=True)
    (results / sweep / "sweep.yaml").write_text(f"sweep: {sweep}\n")
    return writer


def test_per_input_stats_match_numpy(tmp_path):
    rng = np.random.default_rng(0)
    rewards = {i: rng.random(rng.integers(2, 9)) for i in range(40)}
    rewards[3] = np.full(6, 0.25)  # zero std
    _write_trial(tmp_path, "s", "extract-a", rewards, grad_norms={i: float(i) for i in rewards})
    summary = aggregate_sweep(str(tmp_path), "s")
    assert summary.num_inputs == 40 and summary.num_samples == sum(len(r) for r in rewards.values())
    table = pq.read_table(summary.path).to_pylist()
    for row in table:
        r = rewards[row["input_id"]]
        assert row["num_samples"] == len(r)
        assert row["reward_mean"] == pytest.approx(np.mean(r), rel=1e-12)
        assert row["reward_std"] == pytest.approx(np.std(r, ddof=0), rel=1e-9, abs=1e-15)
        assert row["reward_std_unbiased"] == pytest.approx(np.std(r, ddof=1), rel=1e-9, abs=1e-15)
        assert row["grad_norm"] == float(row["input_id"])
        assert row["reward_std_zero"] is (row["input_id"] == 3)  # recomputed: all K rewards equal
        assert row["sweep"] == "s" and row["trial"] == "extract-a"
    assert pq.read_schema(summary.path).metadata[b"rlgrad.schema_version"] == b"4"


def test_aggregation_detects_duplicated_and_lost_rows(tmp_path):
    writer = _write_trial(tmp_path, "s", "extract-a", {0: [0.0, 1.0], 1: [1.0, 1.0, 0.0]})
    samples = ResultsRoot(str(tmp_path)).read_table("s", "samples")
    with pytest.raises(AggregationError, match="lost or duplicated"):
        per_input_table(pa.concat_tables([samples, samples.slice(0, 1)]), ResultsRoot(str(tmp_path)).read_table("s", "inputs"))
    with pytest.raises(AggregationError, match="lost or duplicated"):
        per_input_table(samples.slice(1), ResultsRoot(str(tmp_path)).read_table("s", "inputs"))
    # a lost sample and a duplicated one in the same input: the count is right, the indices are not
    swapped = pa.concat_tables([samples.slice(1, 1), samples.slice(1)])
    with pytest.raises(AggregationError, match="lost or duplicated"):
        per_input_table(swapped, ResultsRoot(str(tmp_path)).read_table("s", "inputs"))
    # rewriting a shard under the same name replaces it: no duplicate rows, no temp files left
    writer.write("samples", "inputs-000000-000099", samples.select(["step", "input_id", "sample_idx", "reward"]).to_pylist())
    again = ResultsRoot(str(tmp_path)).read_table("s", "samples")
    assert again.num_rows == samples.num_rows
    shard_dir = tmp_path / "s" / "samples" / "extract" / "extract-a"
    assert os.listdir(shard_dir) == ["inputs-000000-000099.parquet"]


def test_reading_refuses_another_schema_version(tmp_path):
    _write_trial(tmp_path, "s", "extract-a", {0: [0.0, 1.0]})
    path = tmp_path / "s" / "metrics" / "x" / "y" / "old.parquet"
    path.parent.mkdir(parents=True)
    table = to_table("metrics", [{"step": 1, "metric": "loss", "value": 1.0, "split": "train"}],
                     {"sweep": "s", "stage": "x", "trial": "y", "config_hash": "h"})
    pq.write_table(table.replace_schema_metadata({"rlgrad.schema_version": "0"}), path)
    with pytest.raises(ValueError, match="schema version 0"):
        ResultsRoot(str(tmp_path)).read_table("s", "metrics")


def test_table_builder_names_bad_columns():
    with pytest.raises(ValueError, match="unknown columns \\['rewardz'\\]"):
        to_table("samples", [{"input_id": 0, "sample_idx": 0, "rewardz": 1.0}])
    with pytest.raises(ValueError, match="'reward' must not be null"):
        to_table("samples", [{"step": 0, "input_id": 0, "sample_idx": 0}], {"sweep": "s", "stage": "a", "trial": "t", "config_hash": "h"})


def test_query_unions_sweeps_and_filters(tmp_path):
    _write_trial(tmp_path, "one", "extract-a", {0: [0.0, 1.0], 1: [1.0, 1.0]})
    _write_trial(tmp_path, "two", "extract-b", {0: [0.5, 0.5, 0.5]})
    for s in ("one", "two"):
        aggregate_sweep(str(tmp_path), s)
    assert list_sweeps(str(tmp_path)) == ["one", "two"]
    rows = run_query(str(tmp_path), "SELECT sweep, count(*) AS n, sum(reward) AS r FROM samples GROUP BY sweep ORDER BY sweep").to_pylist()
    assert rows == [{"sweep": "one", "n": 4, "r": 3.0}, {"sweep": "two", "n": 3, "r": 1.5}]
    only = run_query(str(tmp_path), "SELECT input_id, reward_std FROM inputs WHERE reward_std > 0", ["one"]).to_pylist()
    assert only == [{"input_id": 0, "reward_std": 0.5}]
    with pytest.raises(ValueError, match="no sweep named 'three'"):
        run_query(str(tmp_path), "SELECT 1", ["three"])
    with pytest.raises(ValueError, match="query failed"):
        run_query(str(tmp_path), "SELECT nonsense FROM inputs")


def test_fit_envelope_is_the_smallest_bounding_constant():
    rng = np.random.default_rng(1)
    std = rng.random(100)
    std[:5] = 0.0
    grad = 3.0 * std ** (2 / 3) * rng.random(100)
    c = fit_envelope(std, grad)
    ratios = [g / s ** (2 / 3) for s, g in zip(std, grad) if s > 0]
    assert c == pytest.approx(max(ratios))
    assert np.all(grad[std > 0] <= c * std[std > 0] ** (2 / 3) * (1 + 1e-12))
    assert fit_envelope(np.zeros(3), np.zeros(3)) is None


def test_report_holds_every_plot_and_its_data(tmp_path):
    rng = np.random.default_rng(2)
    rewards = {i: rng.random(8) * (i % 4 != 0) for i in range(30)}  # every 4th input: all zero rewards, std 0
    _write_trial(tmp_path, "s", "extract-a", rewards, grad_norms={i: float(np.std(r)) for i, r in rewards.items()},
                 parent="sft-x")
    _write_trial(tmp_path, "s", "sft-x", {}, stage="sft")
    ResultsRoot(str(tmp_path)).trial_storage("s", "sft", "sft-x", "h").write(
        "metrics", "steps-1", [{"step": s, "metric": "loss", "value": 1.0 / s, "split": "train"} for s in (1, 2, 3)])
    aggregate_sweep(str(tmp_path), "s")
    page = decoded(open(build_report(str(tmp_path), "s"), encoding="utf-8").read())
    for anchor in ("reward-mean-vs-std", "grad-norm-vs-std", "reward-std-distribution", "curve-loss"):
        assert f'id="{anchor}"' in page
    assert "sft(x=sft-x) → extract(x=extract-a)" in page  # trials are named by their lineage
    assert "8 of 30 inputs have reward std 0" in page
    stds = np.array([np.std(r) for r in rewards.values()])
    c = fit_envelope(stds, stds)  # grad_norm was set equal to the std above
    assert f"{c:.3g}·std^(2/3)" in page  # the fitted envelope trace
    assert "<script" in page and "<script src=" not in page  # self-contained: plotly.js inlined, nothing fetched


def test_unsorted_rows_give_the_same_table_as_sorted_ones(tmp_path):
    rng = np.random.default_rng(5)
    rewards = {i: rng.random(rng.integers(2, 7)) for i in range(30)}
    _write_trial(tmp_path, "s", "extract-b", rewards, grad_norms={i: float(i) for i in rewards})
    _write_trial(tmp_path, "s", "extract-a", rewards, grad_norms={i: 2.0 * i for i in rewards})
    samples = ResultsRoot(str(tmp_path)).read_table("s", "samples")
    inputs = ResultsRoot(str(tmp_path)).read_table("s", "inputs")
    sorted_result = per_input_table(samples, inputs)  # segmented scan: shards arrive in input order
    shuffled = samples.take(pa.array(rng.permutation(samples.num_rows)))
    hashed_result = per_input_table(shuffled, inputs)  # the hash group-by fallback
    for name in sorted_result.column_names:
        if name in ("reward_mean", "reward_std", "reward_std_unbiased"):  # summation order differs
            np.testing.assert_allclose(hashed_result[name].to_numpy(), sorted_result[name].to_numpy(), rtol=1e-12)
        else:
            assert hashed_result[name].equals(sorted_result[name]), name
    assert sorted_result["trial"].to_pylist()[:1] == ["extract-a"]  # ordered by trial id, then input
    assert per_input_table(shuffled, None)["prompt"].to_pylist() == sorted_result["prompt"].to_pylist()


def decoded(page: str) -> str:
    """The page's text with JSON \\uXXXX escapes decoded: plotly writes its figure JSON with
    orjson when installed (literal characters) and with the json module otherwise (escapes)."""
    return re.sub(r"\\u([0-9a-fA-F]{4})", lambda m: chr(int(m.group(1), 16)), page)
