"""The small context a workload runs in.

A workload is `run_<name>(config, ctx)`. It never talks to Ray: the Ray
adapter in orchestrator/ builds a context whose `report_fn` forwards to
`ray.train.report`; tests and the plain-Python path use `local_context`.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass, field
from typing import Callable

from .storage import ResultsRoot, TrialStorage

# report_fn(metrics, checkpoint_dir or None); the checkpoint dir is a local
# directory the workload filled (save_pretrained, torch state) and may delete
# after the call returns.
ReportFn = Callable[[dict, "str | None"], None]


@dataclass
class WorkloadContext:
    writer: TrialStorage  # this trial's shards (and small files) in the results root
    rank: int = 0
    world_size: int = 1
    device: str = "cpu"
    report_fn: ReportFn | None = None
    # local directory of the checkpoint to resume from (a retried worker), if any
    resume_from: str | None = None
    show_progress: bool = True
    # CPUs this worker holds: torch's intra-op threads are set to match (more
    # threads than cores slows small models down many times)
    num_cpus: float | None = None
    # what the tables record as the model when the orchestrator replaced the config's
    # `model` with a local copy of an earlier stage's checkpoint: "@stage/trial <checkpoint URI>"
    model_source: str | None = None
    _metric_rows: list[dict] = field(default_factory=list, repr=False)
    _metrics_flushed_at: int = field(default=-1, repr=False)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def resume_directory(self) -> str | None:
        """The checkpoint a retried worker continues from, if there is one on disk."""
        return self.resume_from if self.resume_from and os.path.isdir(self.resume_from) else None

    def model_name(self, configured: str) -> str:
        """The model as a user can find it again: the configured name, or the checkpoint it came from."""
        return self.model_source or configured

    def my_items(self, items: list) -> list:
        """This worker's share of `items`: every world_size-th, starting at rank."""
        return items[self.rank :: self.world_size]

    def log_metrics(self, step: int, values: dict[str, float], split: str = "train") -> None:
        """Buffer rows of the `metrics` table (written by rank 0 on report/close)."""
        for name, value in values.items():
            self._metric_rows.append(
                {"step": int(step), "metric": name, "value": None if value is None else float(value), "split": split}
            )

    def report(self, metrics: dict, checkpoint_dir: str | None = None) -> None:
        """Send metrics (and optionally a checkpoint) to whoever is watching.

        Every worker must call this the same number of times (Ray Train
        synchronises on it). With a checkpoint, buffered metric rows are
        flushed first so a restart from that checkpoint never loses them.
        """
        if checkpoint_dir is not None:
            self.flush_metrics()
        if self.report_fn is not None:
            self.report_fn(metrics, checkpoint_dir)

    def report_checkpoint(self, metrics: dict, save: Callable[[str], None]) -> None:
        """Report with a checkpoint that `save(directory)` writes on rank 0 (the other ranks
        hand over none); the temporary directory is gone once Ray (or the local context)
        has copied it."""
        directory = tempfile.mkdtemp(prefix="rlgrad-checkpoint-")
        try:
            if self.is_main:
                save(directory)
            self.report(metrics, checkpoint_dir=directory if self.is_main else None)
        finally:
            shutil.rmtree(directory, ignore_errors=True)

    def flush_metrics(self) -> None:
        if not self._metric_rows:
            return
        if self.is_main:
            first = self._metric_rows[0]["step"]
            last = self._metric_rows[-1]["step"]
            # named by the step range: a retry that replays the same steps overwrites
            self.writer.write("metrics", f"steps-{first:09d}-{last:09d}", self._metric_rows)
        self._metric_rows = []

    def close(self) -> None:
        self.flush_metrics()


def local_context(results: str, sweep: str = "local", stage: str = "stage", trial: str = "trial",
                  config_hash: str = "local", device: str = "cpu", show_progress: bool = True) -> WorkloadContext:
    """A single-process context without Ray: checkpoints are copied to
    <results>/<sweep>/checkpoints/<stage>/<trial>/ and the last metrics kept."""
    root = ResultsRoot(results)
    ctx = WorkloadContext(writer=root.trial_storage(sweep, stage, trial, config_hash), device=device,
                          show_progress=show_progress)
    ctx.reported = []  # type: ignore[attr-defined]
    ctx.checkpoint_path = None  # type: ignore[attr-defined]

    def report_fn(metrics: dict, checkpoint_dir: str | None) -> None:
        ctx.reported.append(dict(metrics))  # type: ignore[attr-defined]
        if checkpoint_dir is not None:
            dest = root.uri(sweep, "checkpoints", stage, trial)  # a local path: results is local here
            if os.path.exists(dest):
                shutil.rmtree(dest)
            shutil.copytree(checkpoint_dir, dest)
            ctx.checkpoint_path = dest  # type: ignore[attr-defined]

    ctx.report_fn = report_fn
    return ctx
