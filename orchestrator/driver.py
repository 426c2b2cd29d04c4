"""Running a sweep on Ray: each stage becomes a Ray Tune run whose trials each
host a Ray Train TorchTrainer; the trainer's workers run the stage's workload.

    run_sweep (this module)    probe the results root, hold the sweep's lock,
                               start or join Ray, run the stages in order
    stage  (stage.py)          grid / Optuna, x parent trials --> Tune trials; the trials table
    trial  (trial.py)          Tune function trial, holds no CPU --> TorchTrainer(ScalingConfig from the spec)
    worker (worker.py)         Train worker --> workloads.run_workload(config, WorkloadContext)
                               --> Parquet shards, checkpoints

Every read and write under the results root goes through
workloads.core.storage.ResultsRoot. These modules import Ray but never build
a model: torch is imported only on the workers.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass

import ray

from workloads import validate_config
from workloads.core.storage import ResultsRoot
from workloads.text.dataset_task import write_snapshots

from .capacity import InfeasibleError, alive_nodes, cluster_can_grow, refuse_infeasible, wait_for_nodes
from .console import console, progress
from .spec import SpecError, SweepSpec, apply_params, grid_points, resolved_spec_yaml
from .stage import TrialOutcome, run_stage

WAIT_FOR_NODES_S = 15 * 60


class SweepError(RuntimeError):
    """The sweep ran but could not finish (a stage had no successful trial)."""


@dataclass
class SweepOutcome:
    sweep_dir: str
    outcomes: dict[str, list[TrialOutcome]]
    dashboard_url: str | None

    @property
    def failed(self) -> list[TrialOutcome]:
        return [o for stage in self.outcomes.values() for o in stage if o.status == "ERROR"]


def run_sweep(spec: SweepSpec, results: str, address: str | None = None, show_progress: bool = True,
              max_concurrent: int | None = None, num_cpus: int | None = None, capture_logs: bool = False,
              wait_for_nodes_s: float = WAIT_FOR_NODES_S) -> SweepOutcome:
    """Run every stage of `spec` in order on the Ray cluster at `address`
    (None: start an embedded local cluster). With capture_logs, Ray's and the
    workers' output goes to the sweep's log directory instead of the console
    (unless the console is verbose)."""
    root = ResultsRoot(results)
    root.check_writable()
    resuming = check_results_dir(spec, root)
    with root.sweep_lock(spec.sweep):
        if capture_logs:
            console().capture(sweep_log_dir(root, spec.sweep))
        started_here = not ray.is_initialized()
        datasets, reward_modules = task_inputs(spec)
        # what every trial reads, wherever it runs: the datasets as the driver read them, in the results root
        task_data = write_snapshots(datasets, root, spec.sweep) if datasets else {}
        try:
            if started_here:
                _quiet_ray(embedded=address is None)
                # reward modules beside the sweep file go to every node with the job (Ray runtime env)
                runtime_env = {"py_modules": reward_modules} if reward_modules else None
                context = ray.init(address=address, num_cpus=num_cpus if address is None else None,
                                   logging_level="INFO" if console().verbose else "WARNING", log_to_driver=True,
                                   runtime_env=runtime_env)
            else:
                context = ray.get_runtime_context()
            can_grow = address is not None and cluster_can_grow()
            if not can_grow:  # before anything is written: a request this cluster can never meet
                try:
                    refuse_infeasible(spec.stages, alive_nodes())
                except InfeasibleError as e:
                    raise SpecError(str(e)) from None
            dashboard = getattr(context, "dashboard_url", None)
            root.write_text(spec.sweep, "sweep.yaml", text=resolved_spec_yaml(spec))
            _announce(spec, root, dashboard, resuming)
            _link_ray_logs(started_here and address is None)
            finished = _finished_trials(root, spec.sweep) if resuming else {}
            outcomes = _run_stages(spec, root, finished, show_progress, max_concurrent,
                                   wait_for_nodes_s if can_grow else None, task_data)
            return SweepOutcome(root.uri(spec.sweep), outcomes, dashboard)
        finally:
            if started_here:
                ray.shutdown()


def sweep_log_dir(root: ResultsRoot, sweep: str) -> str:
    """<results>/<sweep>/logs/ for a local root; a local directory for a bucket (logs are appended to)."""
    if root.is_local:
        return root.uri(sweep, "logs")
    return os.path.join(tempfile.gettempdir(), "rlgrad-logs", sweep)


def _quiet_ray(embedded: bool) -> None:
    """Ray's own knobs for a quiet console (set before ray.init, so the embedded
    cluster's processes inherit them); anything still printed goes to the log file."""
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # Tune's legacy reporter at verbose=0 prints nothing
    os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")  # no CSV/JSON/TensorBoard loggers, no hints
    if embedded:
        # one local node is never preempted; the watcher only logs an error-level line at start-up
        os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")


def _link_ray_logs(embedded: bool) -> None:
    """<sweep>/logs/ray-session -> the embedded cluster's session logs (what the dashboard serves)."""
    log_dir = console().log_dir
    if not (embedded and log_dir):
        return
    try:
        session_logs = os.path.join(ray._private.worker._global_node.get_session_dir_path(), "logs")
        link = os.path.join(log_dir, "ray-session")
        if os.path.islink(link):
            os.unlink(link)
        os.symlink(session_logs, link)
    except (OSError, AttributeError):
        pass  # a convenience only


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


def _announce(spec: SweepSpec, root: ResultsRoot, dashboard: str | None, resuming: bool) -> None:
    progress(f"sweep {spec.sweep!r}: {len(spec.stages)} stage(s); results in {root.uri(spec.sweep)}")
    if dashboard:
        progress(f"Ray dashboard: http://{dashboard}" if "://" not in dashboard else f"Ray dashboard: {dashboard}")
    if resuming:
        progress("this sweep ran here before: finished trials are skipped")


def _finished_trials(root: ResultsRoot, sweep: str) -> dict[str, dict]:
    """Trials of this sweep that finished in an earlier run, by trial id."""
    table = root.read_table(sweep, "trials")
    if table is None:
        return {}
    return {row["trial"]: row for row in table.to_pylist() if row["status"] == "TERMINATED"}


def task_inputs(spec: SweepSpec) -> tuple[list, list[str]]:
    """(dataset specs of `task: dataset` configs, directories of 'file.py:function' rewards) over
    every config the sweep's stages can run (each grid point; the base config of an Optuna search)."""
    datasets, directories = {}, set()
    for stage in spec.stages:
        for params in grid_points(stage):
            config = validate_config(stage.workload, apply_params(stage.config, params))
            if getattr(config, "task", None) == "dataset" and getattr(config, "dataset", None) is not None:
                datasets[config.dataset.source_key()] = config.dataset
            directories.update(getattr(config, "reward_module_directories", lambda: [])())
    return list(datasets.values()), sorted(directories)


def _run_stages(spec: SweepSpec, root: ResultsRoot, finished: dict[str, dict], show_progress: bool,
                max_concurrent: int | None, wait_for_nodes_s: float | None,
                task_data: dict[str, str]) -> dict[str, list[TrialOutcome]]:
    """The stages in order; a stage that starts from another gets its finished trials' checkpoints."""
    outcomes: dict[str, list[TrialOutcome]] = {}
    for stage in spec.stages:
        parent_checkpoints: dict[str, str] = {}
        if stage.from_stage:
            parent_checkpoints = {o.trial.trial_id: o.checkpoint for o in outcomes[stage.from_stage]
                                  if o.status in ("TERMINATED", "SKIPPED") and o.checkpoint}
            if not parent_checkpoints:
                raise SweepError(f"stage {stage.name!r} starts from stage {stage.from_stage!r}, "
                                 "which has no finished trial with a checkpoint")
        if wait_for_nodes_s is not None:  # an autoscaling cluster: wait (bounded) for nodes that fit
            try:
                wait_for_nodes(stage, wait_for_nodes_s, progress)
            except InfeasibleError as e:
                raise SweepError(str(e)) from None
        progress(f"stage {stage.name} ({stage.workload}): starting")
        outcomes[stage.name] = run_stage(spec, stage, root, parent_checkpoints, finished, show_progress, max_concurrent,
                                         task_data)
    return outcomes
