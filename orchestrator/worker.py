"""Where a trial's workload runs: on every Ray Train worker of its TorchTrainer
(`train_loop`), or inside the Tune trial process itself when the stage asks for
`scaling.num_workers: 0` (`run_inline`).

Both build the workload's `WorkloadContext` around Ray's report and checkpoint
calls, write where and when the worker ran (trials/<stage>/<trial>/workers/),
keep rank 0's last report (last_metrics.json, read by the trial's final result)
and mirror every numeric metric onto a Ray gauge for the dashboard.

`loop_config` is the plain dict the trial hands its workers (see
orchestrator/trial.py); torch is imported only where a worker picks its device.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time

import ray
import ray.train
from ray import tune

from workloads import run_workload, validate_config
from workloads.core.context import WorkloadContext
from workloads.core.storage import ResultsRoot, TrialStorage
from workloads.text.dataset_task import use_snapshots


def dashboard_gauges(identity: dict):
    """Every numeric metric a workload reports also becomes a Ray metric
    (`rlgrad_<name>`, tagged with sweep/stage/trial), exported by each node's
    metrics agent to Prometheus and the dashboard's Metrics view."""
    from ray.util.metrics import Gauge

    gauges: dict[str, Gauge] = {}
    tags = {k: identity[k] for k in ("sweep", "stage", "trial")}

    def record(metrics: dict) -> None:
        for name, value in metrics.items():
            if not isinstance(value, (int, float)) or isinstance(value, bool):
                continue
            key = "rlgrad_" + "".join(c if c.isalnum() else "_" for c in name)
            if key not in gauges:
                gauges[key] = Gauge(key, description=f"rlgrad workload metric {name}", tag_keys=tuple(tags))
            gauges[key].set(float(value), tags=tags)

    return record


def train_loop(loop_config: dict) -> None:
    """Runs on every Ray Train worker."""
    import ray.train.torch  # imports torch: only on the workers

    _report_lines_at(loop_config.get("train_log_level", "INFO"))
    train_ctx = ray.train.get_context()
    resume = ray.train.get_checkpoint()  # set when Ray restarted this worker group or the run

    def report(metrics: dict, checkpoint_dir: str | None) -> None:
        checkpoint = ray.train.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
        ray.train.report(metrics, checkpoint=checkpoint)

    run_in_context(loop_config, train_ctx.get_world_rank(), train_ctx.get_world_size(),
                   str(ray.train.torch.get_device()), report, resume.to_directory() if resume else None)


def _report_lines_at(level: str) -> None:
    """Ray 2.60's Train V2 logs "Reporting training result N: ..." at INFO on a logger named by
    its file path (`logging.getLogger(__file__)`), outside `ray.train`, so Train's
    LoggingConfig does not reach it: set that logger's level too."""
    try:
        from ray.train.v2._internal.execution import context as train_context
    except ImportError:  # another Ray version: nothing to quiet
        return
    logging.getLogger(train_context.__file__).setLevel(level)


def run_inline(loop_config: dict, use_gpu: bool) -> None:
    """num_workers: 0 -- the workload runs in the Tune trial process itself.
    (Train V2 refuses ray.train.* calls there, so this reports to Tune directly.)"""
    resume = tune.get_checkpoint()  # set when Tune restarted this trial

    def report(metrics: dict, checkpoint_dir: str | None) -> None:
        checkpoint = tune.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
        tune.report(metrics, checkpoint=checkpoint)

    run_in_context(loop_config, 0, 1, "cuda" if use_gpu else "cpu", report,
                   resume.to_directory() if resume else None)


def run_in_context(loop_config: dict, rank: int, world_size: int, device: str, report, resume_dir) -> None:
    """Build the workload's context around Ray's report/checkpoint calls and run it."""
    use_snapshots(loop_config.get("task_data", {}))  # the sweep's datasets as the driver read them
    config = validate_config(loop_config["workload"], loop_config["config"])
    model_source = None
    if loop_config["parent_checkpoint"]:
        field = loop_config["checkpoint_field"]
        # the tables name the checkpoint by its stage/trial reference and URI, not the worker's local copy
        model_source = f"{getattr(config, field)} {loop_config['parent_checkpoint']}"
        local_dir = ray.train.Checkpoint(loop_config["parent_checkpoint"]).to_directory()
        config = config.model_copy(update={field: local_dir})
    storage = ResultsRoot(loop_config["results"]).trial_storage(**loop_config["identity"])
    record = dashboard_gauges(loop_config["identity"])

    def report_fn(metrics: dict, checkpoint_dir: str | None) -> None:
        record(metrics)
        if rank == 0:  # the trial's final result (and Optuna) read the last report from here
            storage.write_text("last_metrics.json", json.dumps(metrics, default=float))
        report(metrics, checkpoint_dir)

    placement = _placement_record(storage, rank, device)
    ctx = WorkloadContext(
        writer=storage,
        rank=rank,
        world_size=world_size,
        device=device,
        report_fn=report_fn,
        resume_from=resume_dir,
        show_progress=loop_config["show_progress"],
        num_cpus=loop_config["cpus_per_worker"],
        model_source=model_source,
    )
    run_workload(loop_config["workload"], config, ctx)
    placement(finished=True)


def _placement_record(storage: TrialStorage, rank: int, device: str):
    """Write trials/<stage>/<trial>/workers/rank-<r>.json: where and when this worker ran."""
    runtime = ray.get_runtime_context()
    record = {"rank": rank, "node_id": runtime.get_node_id(), "hostname": socket.gethostname(),
              "pid": os.getpid(), "device": device, "started": time.time(), "finished": None,
              "assigned_resources": runtime.get_assigned_resources()}

    def write(finished: bool = False) -> None:
        if finished:
            record["finished"] = time.time()
        storage.write_text(f"workers/rank-{rank}.json", json.dumps(record, indent=2))

    write()
    return write
