"""One stage of a sweep as Ray Tune runs: its trials (a grid, or an Optuna
search, once per finished parent trial), each a Tune function trial
(orchestrator/trial.py), and one row per trial in the `trials` table.

    run_stage -> skip trials that finished in an earlier run
              -> Tuner(trial_fn with the stage's resources, grid or Optuna) per search
              -> TrialOutcome per trial -> trials table
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field

import ray
from ray import tune

from workloads.core.storage import ResultsRoot

from .console import StageProgress, console, progress, trial_fraction, trial_summary
from .spec import ResolvedTrial, StageSpec, SweepSpec, grid_points, resolve_trial
from .trial import StagePlan, trial_fn
from .trial_errors import error_cause, strip_ansi


@dataclass
class TrialOutcome:
    trial: ResolvedTrial
    status: str  # TERMINATED | ERROR | SKIPPED (finished in an earlier run)
    checkpoint: str | None
    metrics: dict = field(default_factory=dict)
    error: str | None = None


def run_stage(spec: SweepSpec, stage: StageSpec, root: ResultsRoot, parent_checkpoints: dict[str, str],
              finished: dict[str, dict], show_progress: bool, max_concurrent: int | None,
              task_data: dict[str, str] | None = None) -> list[TrialOutcome]:
    """Run every trial of `stage` not in `finished`; record each in the trials table."""
    plan = StagePlan(spec.sweep, root, stage, parent_checkpoints, show_progress,
                     train_log_level="INFO" if console().verbose else "WARNING", task_data=dict(task_data or {}))
    trainable = tune.with_resources(tune.with_parameters(trial_fn, plan=plan), _trial_resources(stage))
    parents = list(parent_checkpoints) if stage.from_stage else [None]
    if stage.search.optuna is None:
        outcomes, runs = _grid_runs(stage, parents, finished, max_concurrent)
    else:
        outcomes, runs = [], _optuna_runs(stage, parents, max_concurrent)
    total = sum(tc.num_samples * (len(space["point"]["grid_search"]) if "grid_search" in space["point"] else 1)
                for space, tc in runs)
    opt = stage.search.optuna
    tracker = StageProgress(stage.name, stage.workload, total, (opt.metric, opt.mode) if opt else None)
    for i, (space, tune_config) in enumerate(runs):
        name = stage.name if len(runs) == 1 else f"{stage.name}-{i}"
        tuner = tune.Tuner(trainable, param_space=space, tune_config=tune_config,
                           run_config=_tune_run_config(stage, root, spec.sweep, name, tracker))
        outcomes += [_outcome(stage, result, root) for result in tuner.fit()]
    if runs:
        console().end_status()
        progress(tracker.line())
    for outcome in outcomes:
        if outcome.status != "SKIPPED":
            _record_trial(root, spec.sweep, outcome)
    return outcomes


def _trial_resources(stage: StageSpec) -> dict:
    """What one Tune trial of the stage holds.

    Inline trials run the workload in the trial process, so it holds the worker's
    resources, and Tune may hand the process to the next trial (no new actor and
    no re-import per trial). A trial hosting a TorchTrainer only waits on it; the
    workers hold the resources. Ray needs a non-empty bundle, so ask for a little memory."""
    if stage.scaling.num_workers != 0:
        return {"cpu": 0, "memory": 64 * 1024**2}
    per = stage.scaling.resources_per_worker()
    return {"cpu": per["CPU"], "gpu": per.get("GPU", 0)} | ({"memory": per["memory"]} if "memory" in per else {})


def _tune_run_config(stage: StageSpec, root: ResultsRoot, sweep: str, name: str,
                     tracker: StageProgress) -> tune.RunConfig:
    return tune.RunConfig(
        name=name,
        storage_path=root.uri(sweep, "_tune"),
        callbacks=[_make_progress_callback(stage, tracker)],
        # inline trials are restarted by Tune (from their last checkpoint);
        # worker groups by Ray Train's FailureConfig
        failure_config=tune.FailureConfig(max_failures=stage.failure.max_failures if stage.scaling.num_workers == 0 else 0),
        verbose=0,
    )


def _grid_runs(stage: StageSpec, parents: list, finished: dict[str, dict],
               max_concurrent: int | None) -> tuple[list[TrialOutcome], list[tuple[dict, tune.TuneConfig]]]:
    """The grid's points not finished in an earlier run, as one Tune run; the finished ones as SKIPPED."""
    skipped: list[TrialOutcome] = []
    points = []
    for parent in parents:
        for params in grid_points(stage) or [{}]:
            trial = resolve_trial(stage, params, parent)
            if trial.trial_id in finished:
                row = finished[trial.trial_id]
                skipped.append(TrialOutcome(trial, "SKIPPED", row["checkpoint"], json.loads(row["metrics"] or "{}")))
                progress(f"stage {stage.name}: {trial.trial_id} finished in an earlier run; skipped")
            else:
                points.append({"params": params, "parent": parent})
    if not points:
        return skipped, []
    return skipped, [({"point": tune.grid_search(points)}, _tune_config(stage, max_concurrent))]


def _optuna_runs(stage: StageSpec, parents: list, max_concurrent: int | None) -> list[tuple[dict, tune.TuneConfig]]:
    """One Optuna search per parent trial."""
    from ray.tune.search.optuna import OptunaSearch

    opt = stage.search.optuna
    dists = {"uniform": tune.uniform, "loguniform": tune.loguniform,
             "randint": lambda lo, hi: tune.randint(lo, hi + 1), "choice": lambda *v: tune.choice(list(v))}
    runs = []
    for parent in parents:
        space = {"point": {"params": {k: dists[next(iter(d))](*next(iter(d.values()))) for k, d in opt.params.items()},
                           "parent": parent}}
        searcher = OptunaSearch(metric=opt.metric, mode=opt.mode, seed=opt.seed)
        runs.append((space, _tune_config(stage, max_concurrent, search_alg=searcher, num_samples=opt.num_samples)))
    return runs


def _tune_config(stage: StageSpec, max_concurrent: int | None, **search) -> tune.TuneConfig:
    def name_creator(trial) -> str:
        return _trial_name(stage, trial.config)

    return tune.TuneConfig(**search, max_concurrent_trials=_max_concurrent(stage, max_concurrent),
                           trial_name_creator=name_creator, trial_dirname_creator=name_creator,
                           reuse_actors=stage.scaling.num_workers == 0)


def _max_concurrent(stage: StageSpec, override: int | None) -> int:
    """How many trials of this stage fit on the cluster at once."""
    if override:
        return override
    total = ray.cluster_resources()
    workers = max(1, stage.scaling.num_workers)  # an inline trial holds one worker's resources
    need = {k: v * workers for k, v in stage.scaling.resources_per_worker().items() if v > 0}
    fits = [math.floor(total.get(k, 0) / v) for k, v in need.items()]
    return max(1, min(fits) if fits else 1)


def _trial_name(stage: StageSpec, tune_config: dict) -> str:
    point = tune_config["point"]
    return resolve_trial(stage, point["params"], point["parent"]).trial_id


def _outcome(stage: StageSpec, result, root: ResultsRoot) -> TrialOutcome:
    """A finished Tune trial's result as a TrialOutcome."""
    point = result.config["point"]
    trial = resolve_trial(stage, point["params"], point["parent"])
    metrics = {k: v for k, v in (result.metrics or {}).items() if isinstance(v, (int, float, str, bool))}
    if result.error is not None:
        return TrialOutcome(trial, "ERROR", None, metrics, error=error_cause(result.error))
    checkpoint = metrics.get("rlgrad_checkpoint") or (root.uri_of(result.checkpoint.path) if result.checkpoint else None)
    return TrialOutcome(trial, "TERMINATED", checkpoint, metrics)


def _make_progress_callback(stage: StageSpec, tracker: StageProgress) -> tune.Callback:
    class StageProgressCallback(tune.Callback):
        """The stage's live progress line, and one line per finished or failed trial."""

        def on_trial_start(self, iteration, trials, trial, **info):
            tracker.trial_started(_trial_name(stage, trial.config))

        def on_trial_result(self, iteration, trials, trial, result, **info):
            config = resolve_trial(stage, trial.config["point"]["params"], trial.config["point"]["parent"]).config
            tracker.trial_result(_trial_name(stage, trial.config),
                                 trial_fraction(stage.workload, config.model_dump(), result))

        def on_step_end(self, iteration, trials, **info):
            if tracker.due(console().is_tty):
                console().status(tracker.line())

        def on_trial_complete(self, iteration, trials, trial, **info):
            result = trial.last_result or {}
            name = _trial_name(stage, trial.config)
            tracker.trial_ended(name, result, failed=False)
            point = trial.config["point"]
            summary = trial_summary(stage.workload, point["params"], _workload_metrics(result)
                                    | {"time_total_s": result.get("time_total_s")}, parent=point["parent"])
            progress(f"{stage.name}: done {name} {summary}")

        def on_trial_error(self, iteration, trials, trial, **info):
            name = _trial_name(stage, trial.config)
            tracker.trial_ended(name, None, failed=True)
            text = trial_error_text(trial)
            log = _trial_log(stage, name, text) or trial.error_file
            console().line(f"{stage.name}: FAILED {name}: {error_cause(text) or 'see the log'} (full log: {log})",
                           error=True)

    return StageProgressCallback()


def trial_error_text(trial) -> str:
    """The failed trial's error as Tune wrote it. Tune writes error.txt into the trial's local
    directory first and syncs it to the results storage later, while `trial.get_error()` reads
    the storage copy: when the callback runs, only the local file holds the cause."""
    local = trial.error_file
    if local and os.path.isfile(local):
        with open(local, encoding="utf-8", errors="replace") as f:
            text = f.read()
        if text.strip():
            return text
    error = trial.get_error()
    return str(error) if error is not None else ""


def _trial_log(stage: StageSpec, trial: str, text: str) -> str | None:
    """The failed trial's full error text in <sweep>/logs/trials/<stage>/<trial>.log."""
    log_dir = console().log_dir
    if not log_dir:
        return None
    path = os.path.join(log_dir, "trials", stage.name, f"{trial}.log")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        f.write(strip_ansi(text) + "\n")
    return path


# Tune's own bookkeeping in every result; not worth keeping in the trials table
_TUNE_KEYS = {"date", "done", "experiment_tag", "hostname", "iterations_since_restore", "node_ip", "pid",
              "time_since_restore", "time_this_iter_s", "timestamp", "training_iteration", "trial_id",
              "checkpoint_dir_name", "should_checkpoint"}


def _workload_metrics(result: dict) -> dict:
    """A Tune result without Tune's bookkeeping and rlgrad's own keys: what the workload reported."""
    return {k: v for k, v in result.items() if not k.startswith(("rlgrad_", "config/")) and k not in _TUNE_KEYS}


def _record_trial(root: ResultsRoot, sweep: str, outcome: TrialOutcome) -> None:
    """The trial's row of the trials table: trials/<stage>/<trial>/trial.parquet."""
    trial = outcome.trial
    metrics = _workload_metrics(outcome.metrics)
    if outcome.error:
        metrics["error"] = outcome.error
    root.trial_storage(sweep, trial.stage, trial.trial_id, trial.config_hash).write("trials", "trial", [{
        "workload": trial.workload,
        "params": json.dumps(trial.params, sort_keys=True),
        "config": json.dumps(trial.config.model_dump(mode="json"), sort_keys=True),
        "parent_trial": trial.parent_trial,
        "status": outcome.status,
        "checkpoint": outcome.checkpoint,
        "metrics": json.dumps(metrics, sort_keys=True, default=str),
    }])
