"""ResultsRoot: the one owner of paths, the write probe, the sweep lock, text
files and atomic shard writes under a results root (no Ray, no model)."""

import os
import pickle
import subprocess
import sys

import pytest

from workloads.core.storage import ResultsRoot, ResultsRootError, SweepLock

METRIC_ROW = {"step": 1, "metric": "loss", "value": 0.5, "split": "train"}


def test_paths_of_a_local_root(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    root = ResultsRoot("results")
    assert root.is_local and root.location == str(tmp_path / "results")
    assert root.uri("sw", "sweep.yaml") == str(tmp_path / "results" / "sw" / "sweep.yaml")
    assert root.path("sw", "sweep.yaml") == root.uri("sw", "sweep.yaml")  # local: the filesystem path is the path
    assert root.table_path("sw", "samples", "extract", "extract-1") == str(tmp_path / "results/sw/samples/extract/extract-1")
    assert root.table_path("sw", "samples", trial="ignored without a stage") == str(tmp_path / "results/sw/samples")
    assert root.uri_of("/elsewhere/ckpt") == "/elsewhere/ckpt"
    trial = root.trial_storage("sw", "extract", "extract-1", "h")
    trial.write("metrics", "steps-1-1", [METRIC_ROW])
    assert os.path.isfile(tmp_path / "results/sw/metrics/extract/extract-1/steps-1-1.parquet")
    trial.write_text("workers/rank-0.json", "{}")
    assert (tmp_path / "results/sw/trials/extract/extract-1/workers/rank-0.json").read_text() == "{}"


def test_paths_of_an_object_store_root_need_no_connection():
    root = ResultsRoot("s3://bucket/team/rlgrad")  # nothing listens; nothing is contacted to name paths
    assert not root.is_local and root.location == "s3://bucket/team/rlgrad"
    assert root.uri("sw", "report.html") == "s3://bucket/team/rlgrad/sw/report.html"
    assert root.uri("sw", "checkpoints", "sft") == "s3://bucket/team/rlgrad/sw/checkpoints/sft"
    assert root.uri_of("bucket/team/rlgrad/sw/checkpoints/sft/x") == "s3://bucket/team/rlgrad/sw/checkpoints/sft/x"
    assert root.sweep_lock("sw").path is None  # object stores: no exclusive create, no lock file
    shipped = pickle.loads(pickle.dumps(root))  # how a root travels to Ray workers: as its location
    assert isinstance(shipped, ResultsRoot) and shipped.location == root.location


def test_a_uri_root_resolves_its_filesystem_once(tmp_path):
    root = ResultsRoot(f"file://{tmp_path}/results")
    assert not root.is_local
    assert root.path("sw", "sweep.yaml") == f"{tmp_path}/results/sw/sweep.yaml"
    assert root.fs is root.fs
    root.write_text("sw", "sweep.yaml", text="sweep: sw\n")
    assert root.read_text("sw", "sweep.yaml") == "sweep: sw\n"
    assert root.sweeps() == ["sw"]


def test_text_files_and_missing_ones(tmp_path):
    root = ResultsRoot(str(tmp_path))
    assert root.read_text("sw", "sweep.yaml") is None
    assert root.sweeps() == []
    root.write_text("sw", "sweep.yaml", text="sweep: sw\n")
    (tmp_path / "not-a-sweep").mkdir()
    assert root.read_text("sw", "sweep.yaml") == "sweep: sw\n"
    assert root.sweeps() == ["sw"]
    trial = root.trial_storage("sw", "s", "t", "h")
    assert trial.read_text("last_metrics.json") is None
    trial.write_text("last_metrics.json", '{"loss": 1}')
    assert trial.read_text("last_metrics.json") == '{"loss": 1}'


def test_atomic_writes_leave_no_temporary_and_replace_whole_shards(tmp_path):
    trial = ResultsRoot(str(tmp_path)).trial_storage("sw", "s", "t", "h")
    shard_dir = tmp_path / "sw" / "metrics" / "s" / "t"
    assert not trial.exists("metrics", "steps")
    trial.write("metrics", "steps", [METRIC_ROW, {**METRIC_ROW, "step": 2}])
    assert trial.exists("metrics", "steps")
    assert os.listdir(shard_dir) == ["steps.parquet"]
    trial.write("metrics", "steps", [{**METRIC_ROW, "step": 3}])  # a retry rewrites the same name
    assert os.listdir(shard_dir) == ["steps.parquet"]
    assert trial.read("metrics", "steps", ["step"]) == [{"step": 3}]
    # a writer that died mid-write leaves a hidden temporary: readers never take it
    (shard_dir / ".steps-2.parquet.0123.tmp").write_bytes(b"half a shard")
    table = trial.read_table("metrics")
    assert table.column("step").to_pylist() == [3]
    assert table.column("trial").to_pylist() == ["t"]  # identity columns added on write
    with pytest.raises(ValueError, match="unknown table 'metric'"):
        trial.write("metric", "steps", [METRIC_ROW])


def test_probe_is_one_line_on_an_unwritable_directory(tmp_path):
    (tmp_path / "a-file").write_text("not a directory")
    root = ResultsRoot(str(tmp_path / "a-file" / "results"))
    with pytest.raises(ResultsRootError) as error:
        root.check_writable()
    message = str(error.value)
    assert message.startswith(f"cannot write results to {tmp_path}/a-file/results: ") and "\n" not in message
    writable = ResultsRoot(str(tmp_path / "fresh"))
    writable.check_writable()
    assert os.listdir(tmp_path / "fresh") == []  # the probe cleans up after itself


def test_lock_refuses_a_second_holder_and_takes_over_a_dead_drivers(tmp_path):
    root = ResultsRoot(str(tmp_path))
    lock_file = tmp_path / "sw" / ".driver.lock"
    with root.sweep_lock("sw"):
        assert lock_file.read_text().split()[0] == str(os.getpid())
        with pytest.raises(ResultsRootError, match=rf"sweep directory {tmp_path}/sw is in use by another rlgrad "
                                                   rf"run \(pid {os.getpid()}\)"):
            root.sweep_lock("sw").acquire()
        assert lock_file.read_text().split()[0] == str(os.getpid())  # the refused one did not touch it
    assert not lock_file.exists()  # released

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    lock_file.write_text(f"{dead.pid} 0\n")  # left by a driver that died
    lock = SweepLock(str(tmp_path / "sw"))
    lock.acquire()
    assert lock.held and lock_file.read_text().split()[0] == str(os.getpid())
    lock.release()
    assert not lock_file.exists()
