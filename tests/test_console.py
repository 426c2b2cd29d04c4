"""What `rlgrad run` prints (issue 13: Console; Requests the cluster can never meet).

The `ray` tests run the CLI in a subprocess as CI would (stdout and stderr are
pipes, not a TTY) on an embedded Ray cluster and read its console output."""

import math
import os
import re
import subprocess
import sys
import time

import pytest

from orchestrator.capacity import InfeasibleError, describe_shortfall, fits, refuse_infeasible, wait_for_nodes
from orchestrator.console import StageProgress, trial_summary
from orchestrator.spec import parse_spec

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TINY = """
sweep: tiny
stages:
  - name: a
    workload: noop
    search:
      grid: {x: [0.0, 1.0]}
    config: {num_reports: 2}
    scaling: {num_workers: 1, cpus_per_worker: 1}
"""

GPU64 = """
sweep: big
stages:
  - name: small
    workload: noop
    scaling: {num_workers: 1, cpus_per_worker: 1}
  - name: huge
    workload: noop
    scaling: {num_workers: 64, use_gpu: true}
"""

# what Ray, Tune, Train or a worker would print at error level, or a traceback
ERROR_LINE = re.compile(r"\bERROR\b|\bE \d{4,}|Traceback|core_worker\.cc|Error:")


def _stage(text: str, name: str):
    spec = parse_spec(text, source="<test>")
    return next(s for s in spec.stages if s.name == name)


def _run_cli(tmp_path, spec_text: str, *args: str, timeout: int = 400):
    spec_file = tmp_path / "sweep.yaml"
    spec_file.write_text(spec_text)
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS",)}
    env |= {"PYTHONPATH": REPO, "CI": "1", "RLGRAD_PROGRESS_INTERVAL_S": "10", "TERM": "dumb"}
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "orchestrator.cli", "run", str(spec_file), "--results",
                           str(tmp_path / "results"), "--num-cpus", "2", *args],
                          capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO, stdin=subprocess.DEVNULL)
    return proc, time.monotonic() - started


# ---------------------------------------------------------------- units


def test_trial_summary_drops_meaningless_values():
    result = {"step": 0, "loss": math.nan, "eval_reward_mean": 0.0, "eval_exact_match_mean": 0.0,
              "train_seconds": 4.2e-06, "train_samples_per_s": 0.0, "time_total_s": 51.6}
    line = trial_summary("sft", {"max_steps": 0}, result)
    assert line == "max_steps=0 eval_reward_mean=0 eval_exact_match_mean=0 (52s)"
    trained = trial_summary("sft", {"max_steps": 150}, {**result, "step": 150, "loss": 1.713})
    assert "loss=1.713" in trained and "train_seconds" not in trained


def test_stage_progress_line():
    tracker = StageProgress("sft", "sft", total=4)
    tracker.started = 1000.0
    for t in ("t1", "t2", "t3"):
        tracker.trial_started(t, now=1000.0)
    tracker.trial_ended("t1", {"eval_reward_mean": 0.5}, failed=False, now=1080.0)
    tracker.trial_ended("t2", None, failed=True, now=1050.0)
    tracker.trial_result("t3", 0.5)
    # 2.5 of 4 trials' work in 100 s: 60 s to go
    assert tracker.line(now=1100.0) == ("stage sft: 1/4 done, 1 running, 1 failed | 1m40s elapsed, ETA 1m00s"
                                        " | best eval_reward_mean=0.5")
    # a trial that reports nothing until it ends: its time so far over the finished trials' mean (80 s)
    tracker.trial_started("t4", now=1060.0)
    assert tracker._fraction("t4", now=1100.0) == 0.5
    assert not tracker.due(tty=False, now=1001.0)
    assert tracker.due(tty=False, now=1000.0 + tracker.interval_s)


def test_infeasible_message_names_stage_request_and_cluster():
    stage = _stage(GPU64, "huge")
    nodes = [{"CPU": 2.0, "memory": 8 * 1024**3, "node:10.0.0.1": 1.0}]
    assert not fits(stage, nodes)
    with pytest.raises(InfeasibleError) as e:
        refuse_infeasible([_stage(GPU64, "small"), stage], nodes)
    message = str(e.value)
    assert "\n" not in message
    assert message.startswith("stage 'huge' asks for 64 worker(s) x {1 CPU, 1 GPU}; the cluster has 1 node(s), "
                              "the biggest with {2 CPU, 0 GPU}, in all {2 CPU, 0 GPU}: room for 0 such worker(s)")
    # workers spread over nodes: 3 nodes of 2 CPU hold 6 one-CPU workers, not 7
    assert fits(_stage(TINY.replace("num_workers: 1", "num_workers: 6"), "a"), [{"CPU": 2.0}] * 3)
    assert not fits(_stage(TINY.replace("num_workers: 1", "num_workers: 7"), "a"), [{"CPU": 2.0}] * 3)


class FakeCluster:
    """An autoscaling cluster's state as the driver polls it, on a fake clock."""

    def __init__(self, grows_at: float | None):
        self.now, self.grows_at, self.requests, self.said = 0.0, grows_at, [], []

    def nodes(self):
        gpu_nodes = [{"CPU": 8.0, "GPU": 8.0}] * 8 if self.grows_at is not None and self.now >= self.grows_at else []
        return [{"CPU": 2.0}] + gpu_nodes

    def sleep(self, s):
        self.now += s


def test_autoscaler_wait_times_out_with_one_line():
    cluster = FakeCluster(grows_at=None)
    with pytest.raises(InfeasibleError) as e:
        wait_for_nodes(_stage(GPU64, "huge"), 900, cluster.said.append, get_nodes=cluster.nodes,
                       request=cluster.requests.append, sleep=cluster.sleep, clock=lambda: cluster.now)
    assert str(e.value).startswith("no nodes after 15 min: stage 'huge' asks for 64 worker(s)")
    assert 900 <= cluster.now < 910
    assert "waiting up to 15 min for the autoscaler" in cluster.said[0]
    assert cluster.requests[0] == [{"CPU": 1.0, "GPU": 1.0}] * 64 and cluster.requests[-1] == []


def test_autoscaler_wait_returns_when_nodes_arrive():
    cluster = FakeCluster(grows_at=120)
    wait_for_nodes(_stage(GPU64, "huge"), 900, cluster.said.append, get_nodes=cluster.nodes,
                   request=cluster.requests.append, sleep=cluster.sleep, clock=lambda: cluster.now)
    assert 120 <= cluster.now < 130
    assert cluster.said[-1] == "stage 'huge': the cluster now has room for its workers"
    assert cluster.requests[-1] == []  # the request is withdrawn once the nodes are there


# ---------------------------------------------------------------- through real Ray


@pytest.mark.ray
def test_console_of_a_tiny_sweep(tmp_path):
    proc, _ = _run_cli(tmp_path, TINY)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = (proc.stdout + proc.stderr).splitlines()
    assert len(lines) <= 20, "\n".join(lines)
    assert all(line.startswith("[rlgrad] ") for line in lines), "\n".join(lines)
    assert not [line for line in lines if ERROR_LINE.search(line)], "\n".join(lines)
    assert any(line.startswith("[rlgrad] Ray dashboard: http") for line in lines)
    progress = [line for line in lines if re.match(r"\[rlgrad\] stage a: \d/2 done, \d running, \d failed \| ", line)]
    assert progress and progress[-1].startswith("[rlgrad] stage a: 2/2 done, 0 running, 0 failed")
    assert len([line for line in lines if re.match(r"\[rlgrad\] a: done a-[0-9a-f]{10} x=[01]\.0 objective=", line)]) == 2
    log = tmp_path / "results" / "tiny" / "logs" / "driver.log"
    assert any(line == f"[rlgrad] Ray's and the workers' logs: {log.parent} (driver.log)" for line in lines)
    assert log.is_file() and "==== rlgrad run" in log.read_text()


@pytest.mark.ray
def test_verbose_shows_rays_lines(tmp_path):
    proc, _ = _run_cli(tmp_path, TINY, "--verbose")
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout + proc.stderr
    assert "Reporting training result" in out  # Ray Train's per-report line, INFO under --verbose
    assert re.search(r"\((RayTrainWorker|TrainController) pid=\d+", out)  # forwarded worker output


@pytest.mark.ray
def test_request_the_embedded_cluster_can_never_meet_is_refused_at_once(tmp_path):
    proc, elapsed = _run_cli(tmp_path, GPU64, timeout=120)
    assert elapsed < 60, elapsed
    assert proc.returncode == 2, proc.stdout + proc.stderr
    errors = proc.stderr.strip().splitlines()
    assert len(errors) == 1, proc.stderr
    assert re.fullmatch(r"rlgrad: error: stage 'huge' asks for 64 worker\(s\) x \{1 CPU, 1 GPU\}; the cluster has "
                        r"1 node\(s\), the biggest with \{2 CPU, 0 GPU\}, in all \{2 CPU, 0 GPU\}: room for 0 such "
                        r"worker\(s\); .*", errors[0]), errors[0]
    assert "[rlgrad] stage" not in proc.stdout  # no stage started, not even the feasible one
    assert not (tmp_path / "results" / "big" / "sweep.yaml").exists()  # a fixed file can run here later


def test_failed_trial_prints_its_cause_and_the_path_of_its_full_log(tmp_path):
    import io

    from orchestrator.console import Console, console, set_console
    from orchestrator.stage import _make_progress_callback, _trial_name

    stage = _stage(TINY, "a")
    out = io.StringIO()
    previous = console()
    con = set_console(Console(stream=out))
    con.log_dir = str(tmp_path / "logs")
    ray_text = ("\x1b[36mray::ImplicitFunc.train()\x1b[39m (pid=1, ip=10.0.0.1)\nTraceback (most recent call last):\n"
                '  File "x.py", line 1, in f\nray.train.WorkerGroupError: Training failed\nValueError: boom at step 3')

    class FakeTrial:
        config = {"point": {"params": {"x": 0.0}, "parent": None}}
        error_file = "/nonexistent/error.txt"

        def get_error(self):
            return RuntimeError(ray_text)

    try:
        tracker = StageProgress("a", "noop", total=2)
        callback = _make_progress_callback(stage, tracker)
        callback.on_trial_start(0, [], FakeTrial())
        callback.on_trial_error(0, [], FakeTrial())
    finally:
        set_console(previous)
    name = _trial_name(stage, FakeTrial.config)
    log = tmp_path / "logs" / "trials" / "a" / f"{name}.log"
    assert out.getvalue() == f"[rlgrad] a: FAILED {name}: ValueError: boom at step 3 (full log: {log})\n"
    assert "Traceback (most recent call last)" in log.read_text() and "\x1b[" not in log.read_text()
    assert tracker.failed == 1 and not tracker.running
