"""The spec's per-worker resources reach Ray: on a simulated multi-node cluster
(ray.cluster_utils.Cluster) trials are placed where the spec says, and queued
when the resources they need are short."""

import glob
import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.ray

SPEC = """
sweep: placement
stages:
  - name: gpu_inline          # the trial itself holds one (declared) GPU
    workload: noop
    config: {sleep_s: 1.0}
    search: {grid: {x: [0.0, 1.0, 2.0]}}
    scaling: {num_workers: 0, use_gpu: true, gpus_per_worker: 1, cpus_per_worker: 1}
  - name: big_workers         # a 2-worker Train group needing a resource only one node has
    workload: noop
    config: {sleep_s: 1.0}
    search: {grid: {x: [0.0, 1.0]}}
    scaling: {num_workers: 2, cpus_per_worker: 1, custom_resources: {big_node: 1}}
"""


def _records(results, stage):
    out = {}
    for path in glob.glob(os.path.join(results, "placement", "trials", stage, "*", "workers", "rank-*.json")):
        record = json.loads(open(path).read())
        out.setdefault(path.split(os.sep)[-3], []).append(record)
    return out


def _no_overlap(intervals):
    intervals = sorted(intervals)
    return all(a_end <= b_start for (_, a_end), (b_start, _) in zip(intervals, intervals[1:]))


@pytest.fixture
def cluster():
    from ray.cluster_utils import Cluster

    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    nodes = {
        "gpu": c.add_node(num_cpus=2, num_gpus=1, resources={"big_node": 2}),
        "cpu": c.add_node(num_cpus=2),
    }
    c.wait_for_nodes()
    try:
        yield c, nodes
    finally:
        c.shutdown()


def test_trials_go_where_the_spec_says_and_queue_when_short(cluster, tmp_path):
    c, nodes = cluster
    spec = tmp_path / "placement.yaml"
    spec.write_text(SPEC)
    results = str(tmp_path / "results")
    proc = subprocess.run([sys.executable, "-m", "orchestrator.cli", "run", str(spec), "--results", results,
                           "--address", c.address, "--quiet"], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    gpu_node = nodes["gpu"].node_id

    inline = _records(results, "gpu_inline")
    assert len(inline) == 3
    for (record,) in inline.values():
        assert record["node_id"] == gpu_node  # the only node with a GPU
        assert record["assigned_resources"].get("GPU") == 1.0
    # one GPU in the cluster: the three trials ran one after another
    assert _no_overlap([(r["started"], r["finished"]) for (r,) in inline.values()])

    groups = _records(results, "big_workers")
    assert len(groups) == 2
    for workers in groups.values():
        assert sorted(w["rank"] for w in workers) == [0, 1]
        assert {w["node_id"] for w in workers} == {gpu_node}  # only that node has big_node
        assert all(w["assigned_resources"].get("big_node") == 1.0 for w in workers)
    # big_node: 2 in the cluster, a trial needs 2: the second trial waited for the first
    spans = [(min(w["started"] for w in ws), max(w["finished"] for w in ws)) for ws in groups.values()]
    assert _no_overlap(spans)
