"""A user's own JSONL and reward module, in a folder of their own, through the embedded Ray
cluster: extraction and GRPO on them, with the folder deleted once the driver has read it --
the workers read the driver's snapshot of the data and the reward module Ray shipped. And a
reward that raises: that trial fails with one line naming the function and the input, and
the shards written before it stay."""

import copy
import json
import math
import os
import shutil
import sys

import pytest
import ray
import yaml

import orchestrator.driver as driver
from orchestrator.console import console
from orchestrator.spec import load_spec
from workloads.core.storage import ResultsRoot

pytestmark = pytest.mark.ray

REWARDS = '''
import re


def correct(prompts, completions, answer, **kwargs):
    firsts = [re.search(r"-?\\d+", c) for c in completions]
    return [float(m is not None and m.group() == a) for m, a in zip(firsts, answer)]


def brief(prompts, completions, **kwargs):
    return [None if not c.strip() else float(len(c.split()) <= 3) for c in completions]


def fails_on(prompts, completions, a, **kwargs):
    if 9 in a:
        raise KeyError("no reward for nine")
    return [0.0 for _ in completions]
'''


def user_folder(tmp_path, stages: list[dict]) -> str:
    folder = tmp_path / "my_project"  # not on sys.path: only the sweep file names it
    folder.mkdir()
    rows = [{"question": f"What is {a} times {b}?", "answer": str(a * b), "a": a} for a in range(2, 10) for b in (3, 7)]
    (folder / "questions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "my_rewards.py").write_text(REWARDS)
    (folder / "sweep.yaml").write_text(yaml.safe_dump({"sweep": "mine", "stages": stages}, sort_keys=False))
    assert str(folder) not in sys.path
    return str(folder)


def common(**more) -> dict:
    return {"model": "builtin:tiny-gpt2", "task": "dataset",
            "dataset": {"path": "questions.jsonl", "prompt": "question", "answer": "answer"},
            "num_samples_per_input": 4, "generation": {"max_new_tokens": 4}, **more}


def run_deleting_the_folder(monkeypatch, folder: str, results: str):
    """run_sweep as `rlgrad run` calls it, the user's folder removed right after Ray started
    (the driver has read the data and Ray has packed the reward module by then)."""
    started = []
    real_init = ray.init

    def init_then_delete(*args, **kwargs):
        started.append(copy.deepcopy(kwargs.get("runtime_env")))  # Ray replaces the paths by its package URIs
        context = real_init(*args, **kwargs)
        shutil.rmtree(folder)
        return context

    monkeypatch.setattr(driver.ray, "init", init_then_delete)
    spec, _ = load_spec(os.path.join(folder, "sweep.yaml"))
    outcome = driver.run_sweep(spec, results, show_progress=False, num_cpus=2)
    assert not os.path.exists(folder) and started
    return spec, outcome, started[0]


def test_a_users_data_and_reward_module_on_the_cluster_without_their_folder(tmp_path, monkeypatch, capsys):
    """One sweep (one Ray start): extraction and GRPO on the user's data and rewards; then a stage
    whose reward raises on the inputs with a = 9."""
    folder = user_folder(tmp_path, [
        {"name": "extract", "workload": "extract", "scaling": {"num_workers": 1},
         "config": common(reward_functions=["my_rewards.py:correct", "my_rewards.py:brief"],
                          reward_weights=[1.0, 0.5], num_inputs=6, shard_size=3)},
        {"name": "grpo", "workload": "grpo", "scaling": {"num_workers": 0},  # in the trial process: no Train start
         "config": common(reward_functions=["my_rewards.py:correct"], num_train_inputs=4, inputs_per_step=2,
                          num_steps=1)},
        {"name": "failing", "workload": "extract", "scaling": {"num_workers": 0},
         "config": common(reward_functions=["my_rewards.py:fails_on"], num_inputs=16, shard_size=2, seed=3)},
    ])
    results = str(tmp_path / "results")
    monkeypatch.setattr(console(), "line", lambda text, error=False: print(text))
    spec, outcome, runtime_env = run_deleting_the_folder(monkeypatch, folder, results)
    assert runtime_env == {"py_modules": [folder]}
    # the config names the files by absolute path (read from the sweep file's folder) ...
    assert spec.stages[0].config["dataset"]["path"] == os.path.join(folder, "questions.jsonl")
    root = ResultsRoot(results)
    trials = {t["stage"]: t for t in root.read_table("mine", "trials").to_pylist()}
    assert trials["extract"]["status"] == trials["grpo"]["status"] == "TERMINATED"
    samples = root.read_table("mine", "samples").to_pylist()
    extract = [r for r in samples if r["stage"] == "extract"]
    assert len(extract) == 6 * 4
    for row in extract:
        components = dict(row["reward_components"])
        brief = 0.0 if math.isnan(components["brief"]) else components["brief"]
        assert row["reward"] == pytest.approx(components["correct"] + 0.5 * brief)
    # ... and every prompt is one of the user's questions, read from the driver's snapshot
    assert all(r["prompt"].startswith("What is ") and " times " in r["prompt"] for r in samples)
    assert {r["stage"] for r in samples} >= {"extract", "grpo"}
    assert os.path.isdir(os.path.join(results, "mine", "task_data"))

    # the raising reward: that trial fails with one line naming the function and the input ...
    [failed] = outcome.failed
    assert failed.trial.stage == "failing" and "reward function fails_on raised KeyError" in failed.error
    line = [entry for entry in capsys.readouterr().out.splitlines() if "FAILED" in entry]
    assert line and "reward function fails_on raised KeyError: 'no reward for nine' on input" in line[0], line
    # ... and what it wrote stays: seed 3 takes the 16 rows in the order 7 9 | 8 2 | 5 14 | ...; row
    # 14 (a = 9) is in the third shard of 2, so the first two shards were written before it raised
    written = [r for r in root.read_table("mine", "inputs").to_pylist() if r["stage"] == "failing"]
    assert sorted(r["input_id"] for r in written) == [2, 7, 8, 9]
