"""The `noop` workload: sleeps and reports a known objective. No model, no data.

Used to smoke-test a cluster (`rlgrad run` a noop sweep before a GPU sweep), to
measure the orchestrator's own overhead (benchmarks/) and to load-test it with
hundreds of trials.
"""

from __future__ import annotations

import time
from typing import ClassVar, Optional

from pydantic import Field

from .core.config import StrictConfig
from .core.context import WorkloadContext


class NoopConfig(StrictConfig):
    """No science: sleeps and reports -(x - 1)^2, to check a cluster or the orchestrator.

    For checking a cluster, the orchestrator's overhead and its load
    behaviour. Reports `objective = -(x - 1)^2`, so a search over `x` has a
    known optimum."""

    checkpoint_field: ClassVar[str] = "init_checkpoint"
    produces_checkpoint: ClassVar[bool] = False

    x: float = Field(0.0, description="the searched value; objective = -(x - 1)^2")
    sleep_s: float = Field(0.0, ge=0, description="seconds slept before each report")
    num_reports: int = Field(1, ge=1, description="reports per trial")
    init_checkpoint: Optional[str] = Field(None, description="filled by `from_stage:`; unused")


def run_noop(config: NoopConfig, ctx: WorkloadContext) -> dict:
    objective = -((config.x - 1.0) ** 2)  # maximised at x = 1
    metrics = {}
    for step in range(1, config.num_reports + 1):
        time.sleep(config.sleep_s)
        metrics = {"step": step, "objective": objective}
        ctx.log_metrics(step, {"objective": objective})
        ctx.report(metrics)
    return metrics
