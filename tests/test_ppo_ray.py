"""SFT -> PPO through real Ray: the PPO stage takes the SFT checkpoint by
reference, runs on a Ray Train worker, and its monitor-set reward rises."""

import json
import os
import subprocess
import sys

import pyarrow.compute as pc
import pytest

from workloads.core.storage import ResultsRoot
from test_tables import decoded  # tests/ is on sys.path (pytest prepend import mode)

pytestmark = pytest.mark.ray

SPEC = """
sweep: sft_ppo
stages:
  - name: sft
    workload: sft
    config: {max_steps: 150, batch_size: 32, learning_rate: 2.0e-3, num_train_inputs: 2000, log_every_steps: 150}
    scaling: {num_workers: 0}
  - name: ppo
    workload: ppo
    from_stage: sft
    config: {num_rollouts: 20, eval_every_rollouts: 10, num_train_inputs: 32, num_eval_inputs: 32, inputs_per_rollout: 16,
             num_samples_per_input: 8, minibatch_size: 32, ppo_epochs: 4, learning_rate: 3.0e-4,
             generation: {max_new_tokens: 14}}
    scaling: {num_workers: 1}
"""


def test_sft_then_ppo_by_reference_through_ray(tmp_path):
    spec = tmp_path / "sft_ppo.yaml"
    spec.write_text(SPEC)
    results = str(tmp_path / "results")
    proc = subprocess.run([sys.executable, "-m", "orchestrator.cli", "run", str(spec), "--results", results, "--quiet"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    trials = {t["stage"]: t for t in ResultsRoot(results).read_table("sft_ppo", "trials").to_pylist()}
    assert trials["ppo"]["parent_trial"] == trials["sft"]["trial"]
    assert json.loads(trials["ppo"]["config"])["model"] == f"@sft/{trials['sft']['trial']}"
    assert trials["ppo"]["status"] == "TERMINATED" and trials["ppo"]["checkpoint"]

    inputs = ResultsRoot(results).read_table("sft_ppo", "inputs", "ppo", trials["ppo"]["trial"])
    before = inputs.filter(pc.equal(inputs["step"], 0))
    after = inputs.filter(pc.equal(inputs["step"], 20))
    assert before.num_rows == after.num_rows == 32
    gain = pc.mean(after["reward_mean"]).as_py() - pc.mean(before["reward_mean"]).as_py()
    assert gain > 0.03, gain  # PPO raised the monitor-set reward

    metrics = ResultsRoot(results).read_table("sft_ppo", "metrics", "ppo", trials["ppo"]["trial"])
    names = set(metrics["metric"].to_pylist())
    assert {"share_reward_std_below_0.05", "kl", "policy_loss", "value_loss"} <= names
    assert len(set(pc.unique(metrics["step"]).to_pylist())) >= 20  # a row per rollout

    page = decoded(open(os.path.join(results, "sft_ppo", "report.html"), encoding="utf-8").read())
    assert 'id="improvement-vs-initial-std"' in page and "step 0 → 20" in page
