"""A scaled-down quickstart through real Ray: Tune trials hosting 2-worker CPU
TorchTrainers, SFT -> extract by reference, Parquet shards, aggregation, report."""

import json
import os
import subprocess
import sys

import pyarrow.parquet as pq
import pytest
import yaml

from orchestrator.query import run_query
from workloads.core.storage import ResultsRoot
from workloads.core.tables import INPUTS, SAMPLES

pytestmark = pytest.mark.ray

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM_INPUTS, K = 12, 4


def _scaled_down_quickstart(tmp_path) -> str:
    with open(os.path.join(REPO, "search_spaces", "quickstart.yaml")) as f:
        spec = yaml.safe_load(f)
    spec["sweep"] = "mini"
    sft, extract = spec["stages"]
    sft["config"].update(num_train_inputs=64, batch_size=8, log_every_steps=5)
    sft["search"]["grid"]["max_steps"] = [0, 10]
    extract["config"].update(num_inputs=NUM_INPUTS, num_samples_per_input=K, batch_size=4, shard_size=4)
    extract["config"]["generation"]["max_new_tokens"] = 8
    extract["scaling"]["num_workers"] = 2
    path = tmp_path / "mini.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return str(path)


def _rlgrad(*args, cwd):
    return subprocess.run([sys.executable, "-m", "orchestrator.cli", *args], capture_output=True, text=True,
                          cwd=cwd, timeout=900)


def test_quickstart_pipeline_through_ray(tmp_path):
    spec = _scaled_down_quickstart(tmp_path)
    results = str(tmp_path / "results")
    proc = _rlgrad("run", spec, "--results", results, "--quiet", cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    assert "report: " in out and "per-input table: " in out

    trials = ResultsRoot(results).read_table("mini", "trials").to_pylist()
    sft = [t for t in trials if t["stage"] == "sft"]
    extract = [t for t in trials if t["stage"] == "extract"]
    assert len(sft) == 2 and len(extract) == 2
    assert all(t["status"] == "TERMINATED" for t in trials)
    # the extract stage started from each SFT checkpoint by reference, not by a pasted path
    assert sorted(t["parent_trial"] for t in extract) == sorted(t["trial"] for t in sft)
    for t in extract:
        assert json.loads(t["config"])["model"] == f"@sft/{t['parent_trial']}"
    for t in sft:
        assert t["checkpoint"] and os.path.isdir(t["checkpoint"])
        assert os.path.exists(os.path.join(results, "mini", "trials", "sft", t["trial"], "config.json"))
        assert "loss" in json.loads(t["metrics"])

    # samples: inputs x K rows per extraction trial, each (trial, input, sample) once, the declared schema
    samples = ResultsRoot(results).read_table("mini", "samples")
    assert samples.schema.remove_metadata().equals(SAMPLES)
    assert samples.num_rows == 2 * NUM_INPUTS * K
    keys = {(r["trial"], r["input_id"], r["sample_idx"]) for r in samples.select(["trial", "input_id", "sample_idx"]).to_pylist()}
    assert len(keys) == samples.num_rows
    # the model column names what a user can find again: the SFT trial and its checkpoint URI,
    # never the worker's temporary copy of it
    checkpoint_of = {t["trial"]: t["checkpoint"] for t in sft}
    parent_of = {t["trial"]: t["parent_trial"] for t in extract}
    for trial, model in {(r["trial"], r["model"]) for r in samples.select(["trial", "model"]).to_pylist()}:
        parent = parent_of[trial]
        assert model.startswith(f"@sft/{parent} ") and "checkpoint_tmp" not in model, model
        assert os.path.basename(model.split(" ", 1)[1]) == os.path.basename(checkpoint_of[parent])
    # both Train workers wrote shards
    shard_dir = os.path.join(results, "mini", "samples", "extract", extract[0]["trial"])
    assert len([f for f in os.listdir(shard_dir) if f.endswith(".parquet")]) == NUM_INPUTS // 4

    inputs = pq.read_table(os.path.join(results, "mini", "inputs.parquet"))
    assert inputs.schema.remove_metadata().equals(INPUTS)
    assert inputs.num_rows == 2 * NUM_INPUTS
    assert inputs.column("grad_norm").null_count == 0

    page = open(os.path.join(results, "mini", "report.html"), encoding="utf-8").read()
    for anchor in ("reward-mean-vs-std", "grad-norm-vs-std", "reward-std-distribution", "curve-loss"):
        assert f'id="{anchor}"' in page
    for t in extract:
        assert t["trial"] in page or "max_steps" in page
    assert "max_steps=10" in page  # trials are named by their SFT parent's parameters

    # metrics table holds the SFT loss curve of the trained trial
    loss = run_query(results, "SELECT count(*) AS n FROM metrics WHERE metric = 'loss'").to_pylist()[0]["n"]
    assert loss >= 2

    # rerunning the same file continues the sweep: nothing reruns, nothing is duplicated
    again = _rlgrad("run", spec, "--results", results, "--quiet", cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count("finished in an earlier run; skipped") == 4
    assert ResultsRoot(results).read_table("mini", "samples").num_rows == 2 * NUM_INPUTS * K

    # query and status verbs work on the result
    q = _rlgrad("query", "--results", results, "SELECT count(*) AS n FROM samples", "--format", "json", cwd=tmp_path)
    assert q.returncode == 0 and json.loads(q.stdout.strip()) == {"n": 2 * NUM_INPUTS * K}
    st = _rlgrad("status", "mini", "--results", results, cwd=tmp_path)
    assert st.returncode == 0 and st.stdout.count("TERMINATED") == 4


def test_a_different_sweep_under_the_same_name_is_refused(tmp_path):
    spec = _scaled_down_quickstart(tmp_path)
    results = tmp_path / "results"
    (results / "mini").mkdir(parents=True)
    (results / "mini" / "sweep.yaml").write_text("sweep: mini\nstages: []\n")
    proc = _rlgrad("run", spec, "--results", str(results), cwd=tmp_path)
    assert proc.returncode == 2
    assert "already holds a different sweep named 'mini'" in proc.stderr
    assert (results / "mini" / "sweep.yaml").read_text() == "sweep: mini\nstages: []\n"


def test_optuna_search_finds_the_optimum_side_of_a_known_objective(tmp_path):
    """OptunaSearch over a config field: the noop workload reports -(x-1)^2, and
    every sampled x lies in the declared range and is what the trial ran with."""
    spec = tmp_path / "opt.yaml"
    spec.write_text("""
sweep: opt
stages:
  - name: search
    workload: noop
    search:
      optuna:
        metric: objective
        mode: max
        num_samples: 6
        seed: 3
        params:
          x: {uniform: [-4.0, 4.0]}
    scaling: {num_workers: 0, cpus_per_worker: 1}
""")
    results = str(tmp_path / "results")
    proc = _rlgrad("run", str(spec), "--results", results, "--quiet", "--max-concurrent", "1", cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    trials = ResultsRoot(results).read_table("opt", "trials").to_pylist()
    assert len(trials) == 6
    xs = [json.loads(t["params"])["x"] for t in trials]
    assert all(-4.0 <= x <= 4.0 for x in xs) and len(set(xs)) == 6
    for t in trials:
        x = json.loads(t["config"])["x"]
        assert x == json.loads(t["params"])["x"]
        assert json.loads(t["metrics"])["objective"] == pytest.approx(-((x - 1.0) ** 2))  # reached Tune and Optuna
