"""Results on S3: every table, checkpoint and the report go to an S3-compatible
server (moto, on loopback, started here), read back through the same URIs."""

import json
import os
import socket
import subprocess
import sys
import time

import pytest

pytestmark = pytest.mark.ray

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUCKET = "rlgrad-results"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def s3_env():
    port = _free_port()
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    env = {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}"}
    try:
        import boto3

        deadline = time.time() + 30
        while True:
            try:
                boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], aws_access_key_id="test",
                             aws_secret_access_key="test", region_name="us-east-1").create_bucket(Bucket=BUCKET)
                break
            except Exception:
                if time.time() > deadline:
                    raise
                time.sleep(0.5)
        old = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        yield env
    finally:
        server.terminate()
        server.wait(timeout=10)
        for k, v in locals().get("old", {}).items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


SPEC = """
sweep: on_s3
stages:
  - name: sft
    workload: sft
    config: {num_train_inputs: 32, batch_size: 8, learning_rate: 3.0e-3, log_every_steps: 2}
    search: {grid: {max_steps: [4]}}
    scaling: {num_workers: 0}          # inline: checkpoint kept by Tune, on S3
  - name: extract
    workload: extract
    from_stage: sft
    config: {num_inputs: 8, num_samples_per_input: 3, batch_size: 4, shard_size: 4, generation: {max_new_tokens: 6}}
    scaling: {num_workers: 2}          # Train workers fetch the checkpoint from S3
"""


def test_sweep_with_results_on_s3(s3_env, tmp_path):
    spec = tmp_path / "s3.yaml"
    spec.write_text(SPEC)
    results = f"s3://{BUCKET}/team/rlgrad"
    proc = subprocess.run([sys.executable, "-m", "orchestrator.cli", "run", str(spec), "--results", results, "--quiet"],
                          capture_output=True, text=True, cwd=tmp_path, env={**os.environ, **s3_env}, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert f"report: {results}/on_s3/report.html" in proc.stdout.replace("s3://" + BUCKET, "s3://" + BUCKET)
    assert not (tmp_path / "results").exists()  # nothing went to local disk

    from orchestrator.query import list_sweeps, run_query
    from workloads.core.storage import ResultsRoot

    assert list_sweeps(results) == ["on_s3"]
    counts = run_query(results, "SELECT count(*) AS n, count(DISTINCT input_id) AS i FROM samples").to_pylist()[0]
    assert counts == {"n": 8 * 3, "i": 8}
    trials = {r["stage"]: r for r in run_query(results, "SELECT * FROM trials").to_pylist()}
    assert trials["sft"]["checkpoint"].startswith(f"s3://{BUCKET}/team/rlgrad/on_s3/")
    assert trials["extract"]["parent_trial"] == trials["sft"]["trial"]
    assert json.loads(trials["extract"]["config"])["model"] == f"@sft/{trials['sft']['trial']}"

    root = ResultsRoot(results)
    fs, base = root.fs, root.path()
    for path in ("on_s3/report.html", "on_s3/inputs.parquet", "on_s3/sweep.yaml"):
        assert fs.get_file_info(f"{base}/{path}").size > 0, path
    assert fs.get_file_info(trials["sft"]["checkpoint"].split("://", 1)[1] + "/config.json").size > 0
