"""Two sweeps into one results root at the same time do not clash; the same
sweep started twice is refused while the first driver runs."""

import os
import subprocess
import sys
import time

import pytest

from orchestrator.query import list_sweeps
from workloads.core.storage import ResultsRoot

pytestmark = pytest.mark.ray

SPEC = """
sweep: {name}
stages:
  - name: a
    workload: noop
    config: {{sleep_s: {sleep}, num_reports: 2}}
    search: {{grid: {{x: [0.0, 1.0, 2.0]}}}}
    scaling: {{num_workers: 0, cpus_per_worker: 0.5}}
"""


def _run(spec, results, cwd):
    return subprocess.Popen([sys.executable, "-m", "orchestrator.cli", "run", str(spec), "--results", results, "--quiet",
                             "--num-cpus", "1"], cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_two_sweeps_at_once_into_one_root(tmp_path):
    results = str(tmp_path / "results")
    specs = []
    for name in ("left", "right"):
        path = tmp_path / f"{name}.yaml"
        path.write_text(SPEC.format(name=name, sleep=0.5))
        specs.append(path)
    procs = [_run(spec, results, tmp_path) for spec in specs]
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, out[-2000:] + err[-2000:]
    assert list_sweeps(results) == ["left", "right"]
    for name in ("left", "right"):
        trials = ResultsRoot(results).read_table(name, "trials").to_pylist()
        assert len(trials) == 3 and {t["sweep"] for t in trials} == {name}
        metrics = ResultsRoot(results).read_table(name, "metrics")
        assert metrics.num_rows == 3 * 2 and set(metrics["sweep"].to_pylist()) == {name}


def test_the_same_sweep_twice_at_once_is_refused(tmp_path):
    results = str(tmp_path / "results")
    spec = tmp_path / "busy.yaml"
    spec.write_text(SPEC.format(name="busy", sleep=3.0))
    first = _run(spec, results, tmp_path)
    try:
        lock = os.path.join(results, "busy", ".driver.lock")
        deadline = time.time() + 120
        while not os.path.exists(lock):
            assert first.poll() is None and time.time() < deadline, first.communicate()
            time.sleep(0.2)
        second = subprocess.run([sys.executable, "-m", "orchestrator.cli", "run", str(spec), "--results", results],
                                cwd=tmp_path, capture_output=True, text=True, timeout=300)
        assert second.returncode == 2
        assert "is in use by another rlgrad run" in second.stderr and second.stderr.count("\n") == 1
        out, err = first.communicate(timeout=600)
        assert first.returncode == 0, out[-2000:] + err[-2000:]
    finally:
        if first.poll() is None:
            first.kill()
    assert not os.path.exists(os.path.join(results, "busy", ".driver.lock"))  # released at the end
    assert len(ResultsRoot(results).read_table("busy", "trials").to_pylist()) == 3
