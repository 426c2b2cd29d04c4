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

import time
from dataclasses import dataclass

import ray

from workloads.core.storage import ResultsRoot

from .spec import SpecError, SweepSpec, resolved_spec_yaml
from .stage import TrialOutcome, progress, run_stage


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
              max_concurrent: int | None = None, num_cpus: int | None = None) -> SweepOutcome:
    """Run every stage of `spec` in order on the Ray cluster at `address`
    (None: start an embedded local cluster)."""
    root = ResultsRoot(results)
    root.check_writable()
    resuming = check_results_dir(spec, root)
    with root.sweep_lock(spec.sweep):
        started_here = not ray.is_initialized()
        try:
            if started_here:
                context = ray.init(address=address, num_cpus=num_cpus if address is None else None,
                                   logging_level="WARNING", log_to_driver=True)
            else:
                context = ray.get_runtime_context()
            dashboard = getattr(context, "dashboard_url", None)
            root.write_text(spec.sweep, "sweep.yaml", text=resolved_spec_yaml(spec))
            _announce(spec, root, dashboard, resuming)
            finished = _finished_trials(root, spec.sweep) if resuming else {}
            outcomes = _run_stages(spec, root, finished, show_progress, max_concurrent)
            return SweepOutcome(root.uri(spec.sweep), outcomes, dashboard)
        finally:
            if started_here:
                ray.shutdown()


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


def _run_stages(spec: SweepSpec, root: ResultsRoot, finished: dict[str, dict], show_progress: bool,
                max_concurrent: int | None) -> dict[str, list[TrialOutcome]]:
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
        t0 = time.time()
        progress(f"stage {stage.name} ({stage.workload}): starting")
        outcomes[stage.name] = run_stage(spec, stage, root, parent_checkpoints, finished, show_progress, max_concurrent)
        ok = sum(o.status != "ERROR" for o in outcomes[stage.name])
        progress(f"stage {stage.name}: {ok}/{len(outcomes[stage.name])} trials done in {time.time() - t0:.0f}s")
    return outcomes
