"""The `noop` workload: sleeps and reports a known objective. No model, no data.

Used to smoke-test a cluster (`rlgrad run` a noop sweep before a GPU sweep), to
measure the orchestrator's own overhead (benchmarks/) and to load-test it with
hundreds of trials.
"""

from __future__ import annotations

import time

from .configs import NoopConfig
from .context import WorkloadContext


def run_noop(config: NoopConfig, ctx: WorkloadContext) -> dict:
    objective = -((config.x - 1.0) ** 2)  # maximised at x = 1
    metrics = {}
    for step in range(1, config.num_reports + 1):
        time.sleep(config.sleep_s)
        metrics = {"step": step, "objective": objective}
        ctx.log_metrics(step, {"objective": objective})
        ctx.report(metrics)
    return metrics
