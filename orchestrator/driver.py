"""Running a sweep on Ray: each stage becomes a Ray Tune run whose trials each
host a Ray Train TorchTrainer; the trainer's workers run the stage's workload.

    stage --(grid / Optuna, x parent trials)--> Tune trials
    Tune trial (function trainable, holds no CPU) --> TorchTrainer(ScalingConfig from the spec)
    Train worker --> workloads.run_workload(config, WorkloadContext) --> Parquet shards, checkpoints

This module imports Ray but never a model: workers import `workloads` lazily.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass, field

from workloads import WORKLOADS
from workloads.core.storage import ResultsRoot, TrialStorage

from .spec import ResolvedTrial, SpecError, StageSpec, SweepSpec, grid_points, resolve_trial, resolved_spec_yaml


class SweepError(RuntimeError):
    """The sweep ran but could not finish (a stage had no successful trial)."""


@dataclass
class StagePlan:
    """Everything a Tune trial of one stage needs; shipped to the trial actor."""

    sweep: str
    root: ResultsRoot
    stage: StageSpec
    parent_checkpoints: dict[str, str]  # parent trial id -> checkpoint URI
    show_progress: bool = True


@dataclass
class TrialOutcome:
    trial: ResolvedTrial
    status: str  # TERMINATED | ERROR | SKIPPED (finished in an earlier run)
    checkpoint: str | None
    metrics: dict = field(default_factory=dict)
    error: str | None = None


def check_results_dir(spec: SweepSpec, root: ResultsRoot) -> bool:
    """Refuse to mix two different sweeps under one name. True when resuming."""
    existing = root.read_text(spec.sweep, "sweep.yaml")
    if existing is None:
        return False
    if existing != resolved_spec_yaml(spec):
        raise SpecError(
            f"{root.uri(spec.sweep)} already holds a different sweep named {spec.sweep!r} "
            "(its sweep.yaml differs); give this sweep another name, another --results, or delete that directory"
        )
    return True


# ---------------------------------------------------------------- the workers


def _dashboard_gauges(identity: dict):
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


def _run_in_context(loop_config: dict, rank: int, world_size: int, device: str, report, resume_dir) -> None:
    """Build the workload's context around Ray's report/checkpoint calls and run it."""
    from workloads import run_workload, validate_config
    from workloads.core.context import WorkloadContext

    config = validate_config(loop_config["workload"], loop_config["config"])
    model_source = None
    if loop_config["parent_checkpoint"]:
        from ray.train import Checkpoint

        field = loop_config["checkpoint_field"]
        # the tables name the checkpoint by its stage/trial reference and URI, not the worker's local copy
        model_source = f"{getattr(config, field)} {loop_config['parent_checkpoint']}"
        local_dir = Checkpoint(loop_config["parent_checkpoint"]).to_directory()
        config = config.model_copy(update={field: local_dir})
    storage = ResultsRoot(loop_config["results"]).trial_storage(**loop_config["identity"])
    record = _dashboard_gauges(loop_config["identity"])

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
    import socket

    import ray

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


def _train_loop(loop_config: dict) -> None:
    """Runs on every Ray Train worker."""
    import ray.train
    import ray.train.torch

    train_ctx = ray.train.get_context()
    resume = ray.train.get_checkpoint()  # set when Ray restarted this worker group or the run

    def report(metrics: dict, checkpoint_dir: str | None) -> None:
        checkpoint = ray.train.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
        ray.train.report(metrics, checkpoint=checkpoint)

    _run_in_context(loop_config, train_ctx.get_world_rank(), train_ctx.get_world_size(),
                    str(ray.train.torch.get_device()), report, resume.to_directory() if resume else None)


def _run_inline(loop_config: dict, use_gpu: bool) -> None:
    """num_workers: 0 -- the workload runs in the Tune trial process itself."""
    from ray import tune

    resume = tune.get_checkpoint()  # set when Tune restarted this trial

    def report(metrics: dict, checkpoint_dir: str | None) -> None:
        checkpoint = tune.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
        tune.report(metrics, checkpoint=checkpoint)

    _run_in_context(loop_config, 0, 1, "cuda" if use_gpu else "cpu", report,
                    resume.to_directory() if resume else None)


# ---------------------------------------------------------------- the Tune trial


def _trial_fn(tune_config: dict, plan: StagePlan) -> dict:
    """A Tune function trial: resolve the config, run a TorchTrainer, return its final metrics."""
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    from ray import tune

    point = tune_config["point"]
    trial = resolve_trial(plan.stage, point["params"], point["parent"])
    named = tune.get_context().get_trial_name()  # the id the driver computed
    if named != trial.trial_id:
        raise RuntimeError(
            f"trial {named}: this node resolves its config to {trial.trial_id}; the driver and the Ray "
            "nodes run different versions of rlgrad (install the same version everywhere)"
        )
    storage = plan.root.trial_storage(plan.sweep, trial.stage, trial.trial_id, trial.config_hash)
    record = {
        "sweep": plan.sweep,
        "stage": trial.stage,
        "trial": trial.trial_id,
        "config_hash": trial.config_hash,
        "workload": trial.workload,
        "params": trial.params,
        "parent_trial": trial.parent_trial,
        "config": trial.config.model_dump(mode="json"),
    }
    storage.write_text("config.json", json.dumps(record, indent=2))

    scaling = plan.stage.scaling
    loop_config = {
        "workload": trial.workload,
        "config": trial.config.model_dump(mode="json"),
        "checkpoint_field": WORKLOADS[trial.workload].config.checkpoint_field,
        "parent_checkpoint": plan.parent_checkpoints.get(trial.parent_trial) if trial.parent_trial else None,
        "identity": {"sweep": plan.sweep, "stage": trial.stage, "trial": trial.trial_id, "config_hash": trial.config_hash},
        "results": plan.root.location,
        "show_progress": plan.show_progress,
        "cpus_per_worker": scaling.cpus_per_worker,
    }

    def final_result(checkpoint_uri: str | None) -> dict:
        """The last metrics rank 0 reported, a summary of the trial's inputs rows, and its identity."""
        last = json.loads(storage.read_text("last_metrics.json") or "{}")
        final = {k: v for k, v in last.items() if isinstance(v, (int, float, str, bool))}
        final.update(inputs_summary(storage))
        final["rlgrad_trial"] = trial.trial_id
        final["rlgrad_checkpoint"] = checkpoint_uri or ""
        return final

    if scaling.num_workers == 0:
        _run_inline(loop_config, scaling.use_gpu)
        return final_result(None)  # Tune holds an inline trial's checkpoints

    trainer = TorchTrainer(
        _train_loop,
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
        ),
    )
    result = trainer.fit()
    # Train V2's result keeps only checkpointed metrics, and rank 0 sees only its
    # share of the inputs: take its last report and summarise all workers' rows.
    return final_result(plan.root.uri_of(result.checkpoint.path) if result.checkpoint else None)


def inputs_summary(storage: TrialStorage, thresholds: tuple[float, ...] = (0.01, 0.05, 0.1)) -> dict[str, float]:
    """Key numbers of one trial's `inputs` rows (empty if it wrote none)."""
    import pyarrow.compute as pc

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


# ---------------------------------------------------------------- the driver


def _max_concurrent(stage: StageSpec, override: int | None) -> int:
    """How many trials of this stage fit on the cluster at once."""
    if override:
        return override
    import ray

    total = ray.cluster_resources()
    workers = max(1, stage.scaling.num_workers)  # an inline trial holds one worker's resources
    need = {k: v * workers for k, v in stage.scaling.resources_per_worker().items() if v > 0}
    fits = [math.floor(total.get(k, 0) / v) for k, v in need.items()]
    return max(1, min(fits) if fits else 1)


def _finished_trials(root: ResultsRoot, sweep: str) -> dict[str, dict]:
    """Trials of this sweep that finished in an earlier run, by trial id."""
    table = root.read_table(sweep, "trials")
    if table is None:
        return {}
    return {row["trial"]: row for row in table.to_pylist() if row["status"] == "TERMINATED"}


def _progress(message: str) -> None:
    print(f"[rlgrad] {message}", flush=True)


def _make_progress_callback(stage: StageSpec):
    from ray import tune

    class StageProgress(tune.Callback):
        """One line per trial start and end on the driver's console."""

        def on_trial_start(self, iteration, trials, trial, **info):
            _progress(f"stage {stage.name}: started {_trial_name(stage, trial.config)}")

        def on_trial_complete(self, iteration, trials, trial, **info):
            result = _workload_metrics(trial.last_result or {})
            shown = ", ".join(f"{k}={v:.4g}" for k, v in result.items() if isinstance(v, float))[:300]
            _progress(f"stage {stage.name}: finished {_trial_name(stage, trial.config)} ({shown})")

        def on_trial_error(self, iteration, trials, trial, **info):
            _progress(f"stage {stage.name}: FAILED {_trial_name(stage, trial.config)} (see {trial.local_path})")

    return StageProgress()


def _trial_name(stage: StageSpec, tune_config: dict) -> str:
    point = tune_config["point"]
    return resolve_trial(stage, point["params"], point["parent"]).trial_id


def _run_stage(spec: SweepSpec, stage: StageSpec, root: ResultsRoot, parent_checkpoints: dict[str, str],
               finished: dict[str, dict], show_progress: bool, max_concurrent: int | None) -> list[TrialOutcome]:
    from ray import tune

    parents = list(parent_checkpoints) if stage.from_stage else [None]
    plan = StagePlan(spec.sweep, root, stage, parent_checkpoints, show_progress)
    outcomes: list[TrialOutcome] = []
    # Inline trials run the workload in the trial process, so it holds the worker's
    # resources, and Tune may hand the process to the next trial (no new actor and
    # no re-import per trial). A trial hosting a TorchTrainer holds nothing itself.
    inline = stage.scaling.num_workers == 0
    if inline:
        per = stage.scaling.resources_per_worker()
        resources = {"cpu": per["CPU"], "gpu": per.get("GPU", 0)} | ({"memory": per["memory"]} if "memory" in per else {})
    else:
        # The hosting trial only waits on its TorchTrainer; the workers hold the
        # resources. Ray needs a non-empty bundle, so ask for a little memory.
        resources = {"cpu": 0, "memory": 64 * 1024**2}
    trainable = tune.with_resources(tune.with_parameters(_trial_fn, plan=plan), resources)
    tune_run = dict(
        storage_path=root.uri(spec.sweep, "_tune"),
        callbacks=[_make_progress_callback(stage)],
        # inline trials are restarted by Tune (from their last checkpoint);
        # worker groups by Ray Train's FailureConfig
        failure_config=tune.FailureConfig(max_failures=stage.failure.max_failures if stage.scaling.num_workers == 0 else 0),
        verbose=0,
    )

    def name_creator(trial) -> str:
        return _trial_name(stage, trial.config)

    runs: list[tuple[dict, object]] = []  # (param_space, tune_config)
    if stage.search.optuna is None:
        points = []
        for parent in parents:
            for params in grid_points(stage) or [{}]:
                trial = resolve_trial(stage, params, parent)
                if trial.trial_id in finished:
                    row = finished[trial.trial_id]
                    outcomes.append(TrialOutcome(trial, "SKIPPED", row["checkpoint"], json.loads(row["metrics"] or "{}")))
                    _progress(f"stage {stage.name}: {trial.trial_id} finished in an earlier run; skipped")
                else:
                    points.append({"params": params, "parent": parent})
        if points:
            runs.append(({"point": tune.grid_search(points)},
                         tune.TuneConfig(max_concurrent_trials=_max_concurrent(stage, max_concurrent),
                                         trial_name_creator=name_creator, trial_dirname_creator=name_creator,
                                         reuse_actors=inline)))
    else:
        from ray.tune.search.optuna import OptunaSearch

        opt = stage.search.optuna
        dists = {"uniform": tune.uniform, "loguniform": tune.loguniform,
                 "randint": lambda lo, hi: tune.randint(lo, hi + 1), "choice": lambda *v: tune.choice(list(v))}
        for parent in parents:
            space = {"point": {"params": {k: dists[next(iter(d))](*next(iter(d.values()))) for k, d in opt.params.items()},
                               "parent": parent}}
            searcher = OptunaSearch(metric=opt.metric, mode=opt.mode, seed=opt.seed)
            runs.append((space, tune.TuneConfig(search_alg=searcher, num_samples=opt.num_samples,
                                                max_concurrent_trials=_max_concurrent(stage, max_concurrent),
                                                trial_name_creator=name_creator, trial_dirname_creator=name_creator,
                                                reuse_actors=inline)))

    for i, (space, tune_config) in enumerate(runs):
        name = stage.name if len(runs) == 1 else f"{stage.name}-{i}"
        tuner = tune.Tuner(trainable, param_space=space, tune_config=tune_config,
                           run_config=tune.RunConfig(name=name, **tune_run))
        grid = tuner.fit()
        for result in grid:
            point = result.config["point"]
            trial = resolve_trial(stage, point["params"], point["parent"])
            metrics = {k: v for k, v in (result.metrics or {}).items() if isinstance(v, (int, float, str, bool))}
            if result.error is None:
                ckpt = metrics.get("rlgrad_checkpoint") or (root.uri_of(result.checkpoint.path)
                                                            if result.checkpoint else None)
                outcomes.append(TrialOutcome(trial, "TERMINATED", ckpt, metrics))
            else:
                outcomes.append(TrialOutcome(trial, "ERROR", None, metrics, error=str(result.error).splitlines()[0][:500]))
    for outcome in outcomes:
        if outcome.status != "SKIPPED":
            _record_trial(root, spec.sweep, outcome)
    return outcomes


# Tune's own bookkeeping in every result; not worth keeping in the trials table
_TUNE_KEYS = {"date", "done", "experiment_tag", "hostname", "iterations_since_restore", "node_ip", "pid",
              "time_since_restore", "time_this_iter_s", "timestamp", "training_iteration", "trial_id",
              "checkpoint_dir_name", "should_checkpoint"}


def _workload_metrics(result: dict) -> dict:
    """A Tune result without Tune's bookkeeping and rlgrad's own keys: what the workload reported."""
    return {k: v for k, v in result.items() if not k.startswith(("rlgrad_", "config/")) and k not in _TUNE_KEYS}


def _record_trial(root: ResultsRoot, sweep: str, outcome: TrialOutcome) -> None:
    trial = outcome.trial
    writer = root.trial_storage(sweep, trial.stage, trial.trial_id, trial.config_hash)
    metrics = _workload_metrics(outcome.metrics)
    if outcome.error:
        metrics["error"] = outcome.error
    writer.write("trials", "trial", [{
        "workload": trial.workload,
        "params": json.dumps(trial.params, sort_keys=True),
        "config": json.dumps(trial.config.model_dump(mode="json"), sort_keys=True),
        "parent_trial": trial.parent_trial,
        "status": outcome.status,
        "checkpoint": outcome.checkpoint,
        "metrics": json.dumps(metrics, sort_keys=True, default=str),
    }])


@dataclass
class SweepOutcome:
    sweep_dir: str
    outcomes: dict[str, list[TrialOutcome]]
    dashboard_url: str | None

    @property
    def failed(self) -> list[TrialOutcome]:
        return [o for stage in self.outcomes.values() for o in stage if o.status == "ERROR"]


def run_sweep(spec: SweepSpec, results: str, address: str | None = None, show_progress: bool = True,
              max_concurrent: int | None = None, num_cpus: int | None = None) -> SweepOutcome:
    """Run every stage of `spec` in order on the Ray cluster at `address`
    (None: start an embedded local cluster)."""
    import ray

    root = ResultsRoot(results)
    root.check_writable()
    resuming = check_results_dir(spec, root)
    base = root.uri(spec.sweep)
    lock = root.sweep_lock(spec.sweep)
    lock.acquire()
    started_here = not ray.is_initialized()
    try:
        if started_here:
            context = ray.init(address=address, num_cpus=num_cpus if address is None else None,
                               logging_level="WARNING", log_to_driver=True)
        else:
            context = ray.get_runtime_context()
        dashboard = getattr(context, "dashboard_url", None)
        root.write_text(spec.sweep, "sweep.yaml", text=resolved_spec_yaml(spec))
        _progress(f"sweep {spec.sweep!r}: {len(spec.stages)} stage(s); results in {base}")
        if dashboard:
            _progress(f"Ray dashboard: http://{dashboard}" if "://" not in dashboard else f"Ray dashboard: {dashboard}")
        if resuming:
            _progress("this sweep ran here before: finished trials are skipped")
        finished = _finished_trials(root, spec.sweep) if resuming else {}
        outcomes: dict[str, list[TrialOutcome]] = {}
        for stage in spec.stages:
            parent_checkpoints: dict[str, str] = {}
            if stage.from_stage:
                parent_checkpoints = {o.trial.trial_id: o.checkpoint for o in outcomes[stage.from_stage]
                                      if o.status in ("TERMINATED", "SKIPPED") and o.checkpoint}
                if not parent_checkpoints:
                    raise SweepError(f"stage {stage.name!r} starts from stage {stage.from_stage!r}, "
                                     "which has no finished trial with a checkpoint")
            t0 = time.time()
            _progress(f"stage {stage.name} ({stage.workload}): starting")
            outcomes[stage.name] = _run_stage(spec, stage, root, parent_checkpoints, finished, show_progress, max_concurrent)
            ok = sum(o.status != "ERROR" for o in outcomes[stage.name])
            _progress(f"stage {stage.name}: {ok}/{len(outcomes[stage.name])} trials done in {time.time() - t0:.0f}s")
        return SweepOutcome(base, outcomes, dashboard)
    finally:
        lock.release()
        if started_here:
            ray.shutdown()
