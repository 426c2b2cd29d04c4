"""Workload metrics reach Ray's metrics pipeline (Prometheus endpoint of the
node's metrics agent, which the dashboard's Metrics view and Grafana read)."""

import time
import urllib.request

import pytest

pytestmark = pytest.mark.ray


def test_reported_metrics_are_exported_as_ray_gauges_per_trial():
    import ray

    ray.init(num_cpus=1)
    try:
        port = ray._private.worker.global_worker.node.metrics_export_port

        @ray.remote
        def worker_reports():
            from orchestrator.worker import dashboard_gauges

            record = dashboard_gauges({"sweep": "sw", "stage": "extract", "trial": "extract-abc"})
            for _ in range(60):
                record({"samples_per_s": 12.5, "share_reward_std_below_0.05": 0.25, "model": "not a number"})
                time.sleep(0.5)

        ref = worker_reports.remote()
        deadline, lines = time.time() + 45, []
        while time.time() < deadline and len(lines) < 2:
            body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
            lines = [line for line in body.splitlines() if line.startswith("ray_rlgrad_")]
            time.sleep(1)
        ray.cancel(ref, force=True)
    finally:
        ray.shutdown()
    by_name = {line.split("{")[0]: line for line in lines}
    assert set(by_name) == {"ray_rlgrad_samples_per_s", "ray_rlgrad_share_reward_std_below_0_05"}, lines
    assert by_name["ray_rlgrad_samples_per_s"].endswith(" 12.5")
    assert 'trial="extract-abc"' in by_name["ray_rlgrad_samples_per_s"] and 'sweep="sw"' in by_name["ray_rlgrad_samples_per_s"]
