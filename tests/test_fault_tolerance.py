"""Surviving failures with real processes killed: a Train worker mid-trial, and
the driver mid-sweep. Afterwards every (input, sample) row exists exactly once."""

import glob
import json
import os
import signal
import subprocess
import sys
import time

import pyarrow.compute as pc
import pytest

from workloads.core.storage import ResultsRoot

pytestmark = pytest.mark.ray

NUM_INPUTS, K, SHARD = 48, 6, 4

EXTRACT = f"""
  - name: extract
    workload: extract
    FROM_STAGE
    config: {{num_inputs: {NUM_INPUTS}, num_samples_per_input: {K}, batch_size: 4, shard_size: {SHARD},
             generation: {{max_new_tokens: 24}}}}
    scaling: {{num_workers: 2}}
    failure: {{max_failures: 3}}
"""


def _start(spec_path, results, cwd):
    return subprocess.Popen([sys.executable, "-m", "orchestrator.cli", "run", str(spec_path), "--results", results,
                             "--quiet"], cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def _wait_for(predicate, proc, timeout=300, what=""):
    deadline = time.time() + timeout
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"run ended before {what}:\n{proc.stdout.read()[-3000:]}")
        if time.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


def _shards(results, sweep):
    return glob.glob(os.path.join(results, sweep, "samples", "extract", "*", "*.parquet"))


def _train_worker_pids():
    out = subprocess.run(["pgrep", "-f", "ray::RayTrainWorker"], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def _assert_exactly_once(results, sweep):
    samples = ResultsRoot(results).read_table(sweep, "samples")
    keys = [(r["input_id"], r["sample_idx"]) for r in samples.select(["input_id", "sample_idx"]).to_pylist()]
    assert len(keys) == len(set(keys)) == NUM_INPUTS * K
    assert len({i for i, _ in keys}) == NUM_INPUTS


def _mtimes(paths):
    return {p: os.stat(p).st_mtime_ns for p in paths}


def test_killed_train_worker_restarts_and_continues_after_committed_shards(tmp_path):
    spec = tmp_path / "ft.yaml"
    spec.write_text("sweep: ft\nstages:" + EXTRACT.replace("FROM_STAGE", ""))
    results = str(tmp_path / "results")
    proc = _start(spec, results, tmp_path)
    try:
        _wait_for(lambda: len(_shards(results, "ft")) >= 1, proc, what="the first committed shard")
        pids = _train_worker_pids()
        assert pids, "no Ray Train worker process found"
        os.kill(pids[0], signal.SIGKILL)  # a real worker process dies mid-trial
        committed = _mtimes(_shards(results, "ft"))
        out, _ = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, out[-4000:]
    _assert_exactly_once(results, "ft")
    (trial,) = ResultsRoot(results).read_table("ft", "trials").to_pylist()
    assert trial["status"] == "TERMINATED"
    # the restarted worker group kept the shards committed before the kill, untouched
    assert committed and _mtimes(committed) == committed
    assert "failed" in out.lower() or "restart" in out.lower() or "died" in out.lower(), out[-2000:]
    inputs = ResultsRoot(results).read_table("ft", "inputs")
    assert inputs.num_rows == NUM_INPUTS


def test_killed_driver_resumes_the_same_sweep(tmp_path):
    spec = tmp_path / "resume.yaml"
    spec.write_text("""sweep: resume
stages:
  - name: sft
    workload: sft
    config: {num_train_inputs: 32, batch_size: 8, learning_rate: 3.0e-3}
    search: {grid: {max_steps: [0, 3]}}
    scaling: {num_workers: 0}
""" + EXTRACT.replace("FROM_STAGE", "from_stage: sft"))
    results = str(tmp_path / "results")
    proc = _start(spec, results, tmp_path)
    try:
        _wait_for(lambda: len(_shards(results, "resume")) >= 2, proc, what="extraction to be under way")
        os.killpg(proc.pid, signal.SIGKILL)  # the driver and the embedded cluster it started die
        proc.wait(timeout=60)
        committed = _mtimes(_shards(results, "resume"))
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    time.sleep(2)
    before = ResultsRoot(results).read_table("resume", "trials").to_pylist()
    assert {t["stage"] for t in before} == {"sft"}  # the sft stage had finished, extract had not

    again = subprocess.run([sys.executable, "-m", "orchestrator.cli", "run", str(spec), "--results", results, "--quiet"],
                           cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert again.stdout.count("finished in an earlier run; skipped") == 2  # both sft trials
    trials = ResultsRoot(results).read_table("resume", "trials").to_pylist()
    assert sorted(t["stage"] for t in trials) == ["extract", "extract", "sft", "sft"]
    samples = ResultsRoot(results).read_table("resume", "samples")
    for t in (t for t in trials if t["stage"] == "extract"):
        rows = samples.filter(pc.equal(samples["trial"], t["trial"]))
        keys = [(r["input_id"], r["sample_idx"]) for r in rows.select(["input_id", "sample_idx"]).to_pylist()]
        assert len(keys) == len(set(keys)) == NUM_INPUTS * K
    # shards committed before the kill were kept, not redone
    assert committed and _mtimes(committed) == committed
