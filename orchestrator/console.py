"""What `rlgrad run` prints: rlgrad's own lines only, unless --verbose.

Ray, Tune, Train and every worker write to the driver's stdout/stderr (worker
output is forwarded to the driver by Ray's log monitor; raylet warnings arrive
the same way). By default `capture(log_dir)` points the process's file
descriptors 1 and 2 at `<log_dir>/driver.log`, so all of that lands there
(and in Ray's session logs, which the dashboard serves), while rlgrad writes
its own lines to duplicates of the original descriptors. `--verbose` leaves the
descriptors alone: Ray's lines show on the console as they always did.

A stage's live progress line (`StageProgress`) is redrawn in place on a TTY and
printed every `RLGRAD_PROGRESS_INTERVAL_S` seconds (default 30) otherwise.
"""

from __future__ import annotations

import math
import os
import sys
import threading
import time

PROGRESS_INTERVAL_S = float(os.environ.get("RLGRAD_PROGRESS_INTERVAL_S", "30"))
TTY_REFRESH_S = 1.0

# a workload's key metric for the progress line, and how "best" is judged
KEY_METRICS = {"sft": ("eval_reward_mean", "max"), "extract": ("reward_mean", "max"),
               "ppo": ("reward_mean", "max"), "nlpo": ("reward_mean", "max"),
               "controlled": ("test/accuracy", "max"), "noop": ("objective", "max")}
# the few metrics a trial's one-line summary shows (the trials table keeps them all)
SUMMARY_METRICS = {
    "sft": ("eval_reward_mean", "eval_exact_match_mean", "loss"),
    "extract": ("reward_mean", "reward_std_mean", "share_reward_std_below_0.01", "grad_norm_mean"),
    "ppo": ("reward_mean", "reward_std_mean", "kl"),
    "nlpo": ("reward_mean", "reward_std_mean", "kl"),
    "controlled": ("train/accuracy", "test/accuracy"),
    "noop": ("objective",),
}
# how far a running trial is: (reported counter, config field holding its end)
PROGRESS_FIELDS = {"sft": ("step", "max_steps"), "ppo": ("step", "num_rollouts"), "nlpo": ("step", "num_rollouts"),
                   "controlled": ("epoch", "num_epochs"), "noop": ("step", "num_reports")}


class Console:
    """rlgrad's own lines, on the real console whatever Ray does with stdout/stderr."""

    def __init__(self, verbose: bool = False, stream=None):
        self.verbose = verbose
        self._out = stream or sys.stdout
        self._err = stream or sys.stderr
        self._saved: tuple[int, int] | None = None
        self._log_file = None
        self.log_dir: str | None = None
        self._status = ""  # the live line drawn on a TTY
        self._lock = threading.Lock()

    @property
    def is_tty(self) -> bool:
        """Whether the progress line can be redrawn in place (not under --verbose: Ray's lines interleave)."""
        if self.verbose:
            return False
        try:
            return self._out.isatty()
        except (AttributeError, ValueError):
            return False

    # ------------------------------------------------------------ lines

    def line(self, message: str, error: bool = False) -> None:
        with self._lock:
            stream = self._err if error else self._out
            self._clear_status()
            stream.write(f"[rlgrad] {message}\n")
            stream.flush()
            self._draw_status()

    def error(self, message: str) -> None:
        """`rlgrad: error: ...`, the CLI's one-line error."""
        with self._lock:
            self._clear_status()
            self._status = ""
            self._err.write(f"rlgrad: error: {message}\n")
            self._err.flush()

    def status(self, message: str) -> None:
        """The live progress line: redrawn in place on a TTY, printed as a line otherwise."""
        if not self.is_tty:
            self.line(message)
            return
        with self._lock:
            self._clear_status()
            self._status = f"[rlgrad] {message}"
            self._draw_status()

    def end_status(self) -> None:
        with self._lock:
            self._clear_status()
            self._status = ""

    def _clear_status(self) -> None:
        if self._status and self.is_tty:
            self._out.write("\r\x1b[K")
            self._out.flush()

    def _draw_status(self) -> None:
        if self._status and self.is_tty:
            self._out.write(self._status[: _terminal_width() - 1])
            self._out.flush()

    # ------------------------------------------------------------ Ray's output

    def capture(self, log_dir: str) -> str:
        """Send everything written to fds 1 and 2 (Ray, Tune, workers) to <log_dir>/driver.log,
        unless verbose. Returns the log file's path."""
        os.makedirs(log_dir, exist_ok=True)
        self.log_dir = log_dir
        path = os.path.join(log_dir, "driver.log")
        if self.verbose or self._saved is not None:
            return path
        sys.stdout.flush()
        sys.stderr.flush()
        saved = (os.dup(1), os.dup(2))
        # our own lines keep going to the terminal (or the pipe) we started with
        if self._out is sys.stdout:
            self._out = os.fdopen(os.dup(saved[0]), "w", buffering=1, encoding="utf-8", errors="replace")
        if self._err is sys.stderr:
            self._err = os.fdopen(os.dup(saved[1]), "w", buffering=1, encoding="utf-8", errors="replace")
        self._log_file = open(path, "a", buffering=1, encoding="utf-8")
        self._log_file.write(f"\n==== rlgrad run, pid {os.getpid()}, {time.strftime('%Y-%m-%d %H:%M:%S')} ====\n")
        os.dup2(self._log_file.fileno(), 1)
        os.dup2(self._log_file.fileno(), 2)
        self._saved = saved
        return path

    def release(self) -> None:
        """Give fds 1 and 2 back (after Ray has shut down)."""
        self.end_status()
        if self._saved is None:
            return
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(self._saved[0], 1)
        os.dup2(self._saved[1], 2)
        for fd in self._saved:
            os.close(fd)
        self._saved = None
        self._log_file.close()


def _terminal_width() -> int:
    try:
        return os.get_terminal_size(sys.__stdout__.fileno()).columns
    except (OSError, ValueError, AttributeError):
        return 120


_CONSOLE = Console()


def console() -> Console:
    return _CONSOLE


def set_console(new: Console) -> Console:
    global _CONSOLE
    _CONSOLE = new
    return new


def progress(message: str) -> None:
    _CONSOLE.line(message)


# ---------------------------------------------------------------- what lines say


def _meaningful(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def trial_summary(workload: str, params: dict, result: dict, parent: str | None = None) -> str:
    """`max_steps=150  eval_reward_mean=0.5152 loss=1.713 (64s)`: the searched values, the
    workload's key metrics that mean something (NaN dropped; nothing at all for a
    trial that trained zero steps but its evaluation), and the trial's wall time."""
    parts = ([f"from {parent}"] if parent else []) + [f"{k}={v}" for k, v in params.items()]
    names = SUMMARY_METRICS.get(workload) or tuple(k for k, v in result.items() if isinstance(v, float))[:5]
    trained_nothing = result.get("step") == 0
    for name in names:
        value = result.get(name)
        if not _meaningful(value) or (trained_nothing and name == "loss"):
            continue
        parts.append(f"{name}={value + 0.0:.4g}" if isinstance(value, float) else f"{name}={value}")
    seconds = result.get("time_total_s")
    tail = f" ({seconds:.0f}s)" if _meaningful(seconds) else ""
    return " ".join(parts) + tail


def trial_fraction(workload: str, config: dict, result: dict) -> float:
    """How far a running trial is, from its last report (0 when unknown)."""
    counter, end_field = PROGRESS_FIELDS.get(workload, (None, None))
    end = config.get(end_field) if end_field else None
    done = result.get(counter) if counter else None
    if not (_meaningful(end) and _meaningful(done)) or end <= 0:
        return 0.0
    return min(1.0, max(0.0, done / end))


def duration(seconds: float) -> str:
    seconds = int(seconds)
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


class StageProgress:
    """The numbers behind a stage's live line: trials done / running / failed, elapsed,
    ETA (from the share of the stage's work done), the stage's key metric."""

    def __init__(self, stage: str, workload: str, total: int, key_metric: tuple[str, str] | None = None,
                 interval_s: float | None = None):
        self.stage, self.workload, self.total = stage, workload, total
        self.metric, self.mode = key_metric or KEY_METRICS.get(workload, (None, "max"))
        self.started = time.time()
        self.done = self.failed = 0
        self.running: dict[str, float] = {}  # trial -> fraction done, from its reports
        self.trial_started_at: dict[str, float] = {}
        self.durations: list[float] = []  # of this stage's finished trials
        self.best: float | None = None
        self.interval_s = PROGRESS_INTERVAL_S if interval_s is None else interval_s
        self._last_shown = 0.0

    def trial_started(self, trial: str, now: float | None = None) -> None:
        self.running[trial] = 0.0
        self.trial_started_at[trial] = time.time() if now is None else now

    def trial_result(self, trial: str, fraction: float) -> None:
        if trial in self.running:
            self.running[trial] = fraction

    def trial_ended(self, trial: str, result: dict | None, failed: bool, now: float | None = None) -> None:
        self.running.pop(trial, None)
        started = self.trial_started_at.pop(trial, None)
        if started is not None and not failed:
            self.durations.append((time.time() if now is None else now) - started)
        if failed:
            self.failed += 1
            return
        self.done += 1
        value = (result or {}).get(self.metric)
        if _meaningful(value):
            better = self.best is None or (value > self.best if self.mode == "max" else value < self.best)
            self.best = value if better else self.best

    def line(self, now: float | None = None) -> str:
        now = time.time() if now is None else now
        elapsed = now - self.started
        finished = self.done + self.failed
        share = (finished + sum(self._fraction(t, now) for t in self.running)) / self.total if self.total else 1.0
        if finished == self.total:
            eta = "done"
        elif share > 0:
            eta = f"ETA {duration(elapsed * (1 - share) / share)}"
        else:
            eta = "ETA ?"
        text = (f"stage {self.stage}: {self.done}/{self.total} done, {len(self.running)} running, "
                f"{self.failed} failed | {duration(elapsed)} elapsed, {eta}")
        if self.best is not None:
            text += f" | best {self.metric}={self.best + 0.0:.4g}"
        return text

    def _fraction(self, trial: str, now: float) -> float:
        """A running trial's share: from its reports, else its time so far over the finished trials' mean."""
        reported = self.running[trial]
        if reported > 0 or not self.durations or trial not in self.trial_started_at:
            return reported
        return min(0.95, (now - self.trial_started_at[trial]) / (sum(self.durations) / len(self.durations)))

    def due(self, tty: bool, now: float | None = None) -> bool:
        now = time.time() if now is None else now
        if now - self._last_shown >= (TTY_REFRESH_S if tty else self.interval_s) and (
                tty or now - self.started >= self.interval_s):
            self._last_shown = now
            return True
        return False
