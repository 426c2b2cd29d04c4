"""The Tune trial: one point of a stage's search, run as a Tune function trial.

    trial_fn(tune_config, plan)
      resolve the config of the point, check the id the driver gave it
      write trials/<stage>/<trial>/config.json
      run the workload: a TorchTrainer over the stage's workers (orchestrator/worker.py),
                        or inline in this process (scaling.num_workers: 0)
      return the final result: rank 0's last report + a summary of all workers' inputs rows

Torch is imported only where the TorchTrainer is built.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import pyarrow.compute as pc
from ray import tune
from ray.train import FailureConfig, LoggingConfig, RunConfig, ScalingConfig
from ray.tune.integration.ray_train import TuneReportCallback

from workloads import WORKLOADS
from workloads.core.storage import ResultsRoot, TrialStorage
from workloads.text.dataset_task import use_snapshots

from .spec import ResolvedTrial, StageSpec, resolve_trial
from .worker import run_inline, train_loop


@dataclass
class StagePlan:
    """Everything a Tune trial of one stage needs; shipped to the trial actor."""

    sweep: str
    root: ResultsRoot
    stage: StageSpec
    parent_checkpoints: dict[str, str]  # parent trial id -> checkpoint URI
    show_progress: bool = True
    # Ray Train's own `ray.train` lines (e.g. one "Reporting training result" per report): INFO with --verbose
    train_log_level: str = "WARNING"
    # dataset source -> the driver's snapshot of it in the results root (workloads.text.dataset_task)
    task_data: dict[str, str] = field(default_factory=dict)


def trial_fn(tune_config: dict, plan: StagePlan) -> dict:
    """A Tune function trial: resolve the config, run its workload, return its final metrics."""
    point = tune_config["point"]
    use_snapshots(plan.task_data)  # before the config is validated: it reads its task's data
    trial = resolve_trial(plan.stage, point["params"], point["parent"])
    named = tune.get_context().get_trial_name()  # the id the driver computed
    if named != trial.trial_id:
        raise RuntimeError(
            f"trial {named}: this node resolves its config to {trial.trial_id}; the driver and the Ray "
            "nodes run different versions of rlgrad (install the same version everywhere)"
        )
    storage = plan.root.trial_storage(plan.sweep, trial.stage, trial.trial_id, trial.config_hash)
    storage.write_text("config.json", json.dumps(_config_record(plan.sweep, trial), indent=2))
    loop_config = _loop_config(plan, trial)

    if plan.stage.scaling.num_workers == 0:
        run_inline(loop_config, plan.stage.scaling.use_gpu)
        return final_result(storage, None)  # Tune holds an inline trial's checkpoints

    result = _torch_trainer(plan, trial, loop_config).fit()
    # Train V2's result keeps only checkpointed metrics, and rank 0 sees only its
    # share of the inputs: take its last report and summarise all workers' rows.
    return final_result(storage, plan.root.uri_of(result.checkpoint.path) if result.checkpoint else None)


def _config_record(sweep: str, trial: ResolvedTrial) -> dict:
    """trials/<stage>/<trial>/config.json: who the trial is and the config it ran."""
    return {
        "sweep": sweep,
        "stage": trial.stage,
        "trial": trial.trial_id,
        "config_hash": trial.config_hash,
        "workload": trial.workload,
        "params": trial.params,
        "parent_trial": trial.parent_trial,
        "config": trial.config.model_dump(mode="json"),
    }


def _loop_config(plan: StagePlan, trial: ResolvedTrial) -> dict:
    """What every worker of the trial needs (orchestrator/worker.py): plain values only."""
    return {
        "workload": trial.workload,
        "config": trial.config.model_dump(mode="json"),
        "checkpoint_field": WORKLOADS[trial.workload].config.checkpoint_field,
        "parent_checkpoint": plan.parent_checkpoints.get(trial.parent_trial) if trial.parent_trial else None,
        "identity": {"sweep": plan.sweep, "stage": trial.stage, "trial": trial.trial_id, "config_hash": trial.config_hash},
        "results": plan.root.location,
        "show_progress": plan.show_progress,
        "cpus_per_worker": plan.stage.scaling.cpus_per_worker,
        "train_log_level": plan.train_log_level,
        "task_data": plan.task_data,
    }


def _torch_trainer(plan: StagePlan, trial: ResolvedTrial, loop_config: dict):
    from ray.train.torch import TorchTrainer  # imports torch

    scaling = plan.stage.scaling
    return TorchTrainer(
        train_loop,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(
            num_workers=scaling.num_workers,
            use_gpu=scaling.use_gpu,
            resources_per_worker=scaling.resources_per_worker(),
        ),
        run_config=RunConfig(
            name=trial.trial_id,
            storage_path=plan.root.uri(plan.sweep, "checkpoints", trial.stage),
            failure_config=FailureConfig(max_failures=plan.stage.failure.max_failures),
            callbacks=[TuneReportCallback()],
            logging_config=LoggingConfig(log_level=plan.train_log_level),
        ),
    )


def final_result(storage: TrialStorage, checkpoint_uri: str | None) -> dict:
    """The last metrics rank 0 reported, a summary of the trial's inputs rows, and its identity."""
    last = json.loads(storage.read_text("last_metrics.json") or "{}")
    final = {k: v for k, v in last.items() if isinstance(v, (int, float, str, bool))}
    final.update(inputs_summary(storage))
    final["rlgrad_trial"] = storage.trial
    final["rlgrad_checkpoint"] = checkpoint_uri or ""
    return final


def inputs_summary(storage: TrialStorage, thresholds: tuple[float, ...] = (0.01, 0.05, 0.1)) -> dict[str, float]:
    """Key numbers of one trial's `inputs` rows (empty if it wrote none)."""
    table = storage.read_table("inputs")
    if table is None or table.num_rows == 0:
        return {}
    table = table.filter(pc.equal(table["step"], pc.max(table["step"])))  # the model as the trial left it
    std = table["reward_std"]
    summary = {
        "num_inputs": table.num_rows,
        "reward_mean": pc.mean(table["reward_mean"]).as_py(),
        "reward_std_mean": pc.mean(std).as_py(),
    }
    for th in thresholds:
        summary[f"share_reward_std_below_{th}"] = pc.mean(pc.cast(pc.less(std, th), "float64")).as_py()
    if table["grad_norm"].null_count < table.num_rows:
        summary["grad_norm_mean"] = pc.mean(table["grad_norm"]).as_py()
    return summary
