"""The science: data, models, rewards, sampling, gradient norms, training loops.

Each workload is a plain function of its validated config and a
`WorkloadContext`; nothing here imports Ray.
"""

from __future__ import annotations

import importlib
import os
import sys

from .configs import WORKLOADS


def validate_config(workload: str, values: dict):
    """The typed config of `workload` built from plain values (raises pydantic.ValidationError)."""
    if workload not in WORKLOADS:
        raise ValueError(f"unknown workload {workload!r}; allowed: {sorted(WORKLOADS)}")
    config_cls, _ = WORKLOADS[workload]
    return config_cls.model_validate(values)


def run_workload(workload: str, config, ctx):
    """Run `workload` with a config (typed, or plain values to validate) in `ctx`."""
    config_cls, entry = WORKLOADS[workload]
    if not isinstance(config, config_cls):
        config = validate_config(workload, config)
    if ctx.num_cpus is not None:
        threads = max(1, int(ctx.num_cpus))
        if "torch" in sys.modules:
            sys.modules["torch"].set_num_threads(threads)
        else:  # torch reads it when first imported; a workload without torch never pays that import
            os.environ["OMP_NUM_THREADS"] = str(threads)
    module_name, func_name = entry.split(":")
    func = getattr(importlib.import_module(module_name), func_name)
    try:
        return func(config, ctx)
    finally:
        ctx.close()
