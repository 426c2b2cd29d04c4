"""A scaled-down controlled_digits through real Ray: pretrain -> (SFT, RFT) finetunes
by reference, metrics in Parquet for both input groups, and the report section."""

import json
import os
import subprocess
import sys

import pytest
import yaml

from workloads.core.storage import ResultsRoot

pytestmark = pytest.mark.ray

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _scaled_down_digits(tmp_path) -> str:
    with open(os.path.join(REPO, "search_spaces", "controlled_digits.yaml")) as f:
        spec = yaml.safe_load(f)
    spec["sweep"] = "mini_controlled"
    pretrain, finetune = spec["stages"]
    for stage, epochs in ((pretrain, 300), (finetune, 300)):
        stage["config"].update(num_train_samples=400, num_test_samples=200, num_epochs=epochs, log_every_epochs=100,
                               checkpoint_every_epochs=0, model={"type": "mlp", "hidden_sizes": [64, 32]})
        stage["scaling"] = {"num_workers": 0}  # inline trials: tiny stages, no worker-group start-up
    path = tmp_path / "mini_controlled.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return str(path)


def test_controlled_digits_pipeline_through_ray(tmp_path):
    spec = _scaled_down_digits(tmp_path)
    results = str(tmp_path / "results")
    proc = subprocess.run([sys.executable, "-m", "orchestrator.cli", "run", spec, "--results", results, "--quiet"],
                          capture_output=True, text=True, cwd=tmp_path, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    trials = ResultsRoot(results).read_table("mini_controlled", "trials").to_pylist()
    pretrain = [t for t in trials if t["stage"] == "pretrain"]
    finetune = [t for t in trials if t["stage"] == "finetune"]
    assert len(pretrain) == 1 and len(finetune) == 2
    assert all(t["status"] == "TERMINATED" for t in trials)
    for t in finetune:
        assert t["parent_trial"] == pretrain[0]["trial"]
        assert json.loads(t["config"])["init_checkpoint"] == f"@pretrain/{pretrain[0]['trial']}"

    final = {json.loads(t["config"])["opt_method"]: json.loads(t["metrics"]) for t in finetune}
    assert final["supervised"]["modified/accuracy"] > final["expected_reinforce"]["modified/accuracy"] + 0.3

    metrics = ResultsRoot(results).read_table("mini_controlled", "metrics").to_pandas()
    for t in finetune:
        rows = metrics[metrics["trial"] == t["trial"]]
        for split in ("modified", "unmodified"):
            assert {"accuracy", "reward", "reward_std", "grad_norm", "normalized_grad_norm"} <= set(
                rows[rows["split"] == split]["metric"])
        assert sorted(rows["step"].unique()) == [0, 100, 200, 300]  # every row once, no duplicates
        assert not rows.duplicated(["step", "metric", "split"]).any()

    page = open(os.path.join(results, "mini_controlled", "report.html"), encoding="utf-8").read()
    assert "epochs to accuracy" in page and "opt_method = expected_reinforce" in page
