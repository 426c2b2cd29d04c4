"""Your task, your data, your reward: datasets as tasks, Python reward functions (TRL's
signature), reasoning-gym's tasks, the chat template and system prompt, zero_std_tolerance.
Numbers by hand; no Ray (tests/test_your_task_ray.py runs them on the embedded cluster)."""

import json
import math
import os
import subprocess
import sys
import textwrap

import pydantic
import pytest

from workloads.core.context import local_context
from workloads.text.extract_config import ExtractConfig
from workloads.text.python_rewards import RewardFunctionError, build_python_reward
from workloads.text.tasks import reward_of, task_of

from conftest import read_local_table

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


ROWS = [{"q": f"What is {a} plus {b}?", "sum": str(a + b), "alt": [str(a + b), f"{a + b}.0"], "a": a, "b": b}
        for a, b in [(1, 2), (3, 4), (5, 6), (7, 8), (2, 2)]]


def dataset_config(tmp_path, **dataset):
    path = write_jsonl(tmp_path / "data.jsonl", ROWS)
    return ExtractConfig(task="dataset", dataset={"path": path, "prompt": "q", "answer": "sum", **dataset})


# ---------------------------------------------------------------------------
# datasets as tasks
# ---------------------------------------------------------------------------

def test_a_jsonl_file_is_a_task_row_by_row(tmp_path):
    task = task_of(dataset_config(tmp_path, prompt="Q: {q} (a={a})", answer=["sum", "alt"]))
    assert task.split_size("train") == 5
    [ex] = task.examples("train", [1])
    assert ex.input_id == 1 and ex.source == "Q: What is 3 plus 4? (a=3)"
    assert task.references(ex) == ["7", "7", "7.0"] and ex.target == "7"
    assert task.columns(ex) == ROWS[1]
    assert task.choose_inputs("train", 5, seed=7) == task.choose_inputs("train", 5, seed=7)
    assert sorted(task.choose_inputs("train", 5, seed=7)) == [0, 1, 2, 3, 4]


def test_sft_trains_on_the_completion_field_when_named(tmp_path):
    rows = [dict(r, worked=f"{r['a']} + {r['b']} = {r['sum']}") for r in ROWS]
    path = write_jsonl(tmp_path / "data.jsonl", rows)
    task = task_of(ExtractConfig(task="dataset", dataset={"path": path, "prompt": "q", "answer": "sum",
                                                          "completion": "worked"}))
    [ex] = task.examples("train", [0])
    assert task.train_references(ex) == ["1 + 2 = 3"] and task.references(ex) == ["3"]


def test_every_local_format_and_the_hub_call_on_a_local_copy(tmp_path):
    import datasets

    table = datasets.Dataset.from_list(ROWS)
    table.to_parquet(str(tmp_path / "d.parquet"))
    datasets.Dataset.from_list([{k: v for k, v in r.items() if k != "alt"} for r in ROWS]).to_csv(str(tmp_path / "d.csv"))
    datasets.DatasetDict({"train": table, "test": table.select([0, 1])}).save_to_disk(str(tmp_path / "saved"))
    (tmp_path / "hub_like").mkdir()  # what load_dataset(<hub id>) reads: split files in a repository
    write_jsonl(tmp_path / "hub_like" / "train.jsonl", ROWS)
    write_jsonl(tmp_path / "hub_like" / "validation.jsonl", ROWS[:2])
    for path, splits in [("d.parquet", {"train": 5}), ("d.csv", {"train": 5}),
                         ("saved", {"train": 5, "test": 2}), ("hub_like", {"train": 5, "validation": 2})]:
        task = task_of(ExtractConfig(task="dataset", dataset={"path": str(tmp_path / path), "prompt": "q",
                                                              "answer": "sum"}))
        assert {s: task.split_size(s) for s in splits} == splits, path
        assert task.examples("train", [3])[0].source == "What is 7 plus 8?"
        assert task.has_split("validation") == ("validation" in splits)
    mapped = task_of(ExtractConfig(task="dataset", dataset={"path": str(tmp_path / "d.parquet"), "prompt": "q",
                                                            "answer": "sum", "splits": {"validation": "train"}}))
    assert mapped.split_size("validation") == 5


@pytest.mark.parametrize("dataset, message", [
    ({"prompt": "question"}, r"dataset.prompt names field\(s\) \['question'\] that the data lacks; it has \['q', 'sum'"),
    ({"prompt": "{q} and {nope}"}, r"dataset.prompt names field\(s\) \['nope'\]"),
    ({"answer": ["sum", "total"]}, r"dataset.answer names field\(s\) \['total'\]"),
    ({"completion": "worked"}, r"dataset.completion names field\(s\) \['worked'\]"),
    ({"prompt": "{}"}, r"a template names fields as \{field\}"),
    ({"splits": {"dev": "train"}}, r"splits names \['dev'\]; the keys are our splits"),
])
def test_a_bad_dataset_block_is_one_line_naming_the_field(tmp_path, dataset, message):
    with pytest.raises(pydantic.ValidationError, match=message):
        dataset_config(tmp_path, **dataset)


def test_bad_data_is_one_line_naming_the_file(tmp_path):
    (tmp_path / "empty.jsonl").write_text("")
    (tmp_path / "fake.parquet").write_text("this is not parquet\n")
    (tmp_path / "notes.txt").write_text("q,sum\n")
    cases = [("empty.jsonl", r"could not be read as a dataset|has no rows"),
             ("fake.parquet", r"dataset.path '.*fake.parquet' could not be read as a dataset \(\w+"),
             ("notes.txt", r"a file must end in one of \['.jsonl', '.json', '.parquet', '.csv'\] \(got '.txt'\)"),
             ("missing.jsonl", r"dataset.path '.*missing.jsonl': no such file or directory")]
    for name, message in cases:
        with pytest.raises(pydantic.ValidationError, match=message) as caught:
            ExtractConfig(task="dataset", dataset={"path": str(tmp_path / name), "prompt": "q", "answer": "sum"})
        assert str(tmp_path / name) in str(caught.value), name


def test_an_unreachable_hub_id_is_one_line_naming_it(monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens there
    monkeypatch.setattr("workloads.text.dataset_task.hub_unavailable", lambda: True)
    with pytest.raises(pydantic.ValidationError, match=r"dataset.path 'someone/their-data' is no local file or "
                                                       r"directory, and as a hub id it is not cached here"):
        ExtractConfig(task="dataset", dataset={"path": "someone/their-data"})


def test_a_dataset_block_needs_task_dataset_and_task_args_need_reasoning_gym(tmp_path):
    with pytest.raises(pydantic.ValidationError, match="the `dataset` block describes `task: dataset`"):
        ExtractConfig(task="reverse", dataset={"path": "x.jsonl"})
    with pytest.raises(pydantic.ValidationError, match=r"task_args = \{'n': 1\}: task 'reverse' takes none"):
        ExtractConfig(task="reverse", task_args={"n": 1})
    with pytest.raises(pydantic.ValidationError, match="task: dataset needs a `dataset:` block"):
        ExtractConfig(task="dataset")


def test_snapshots_are_read_when_the_source_is_gone(tmp_path):
    """What a worker on another node does: the driver wrote the data into the results root."""
    from workloads.core.storage import ResultsRoot
    from workloads.text import dataset_task, tasks

    config = dataset_config(tmp_path)
    snapshots = dataset_task.write_snapshots([config.dataset], ResultsRoot(str(tmp_path / "results")), "sweep")
    [uri] = snapshots.values()
    assert os.path.isfile(os.path.join(uri, "train.parquet"))
    os.remove(tmp_path / "data.jsonl")
    tasks.task_named.cache_clear()
    try:
        dataset_task.use_snapshots(snapshots)
        again = ExtractConfig(task="dataset", dataset={"path": str(tmp_path / "data.jsonl"), "prompt": "q",
                                                       "answer": "sum"})
        assert task_of(again).examples("train", [4])[0].source == "What is 2 plus 2?"
    finally:
        dataset_task.use_snapshots({})
        tasks.task_named.cache_clear()


# ---------------------------------------------------------------------------
# Python reward functions
# ---------------------------------------------------------------------------

REWARDS = '''
import math

def correct(prompts, completions, sum, **kwargs):
    return [float(c.strip() == s) for c, s in zip(completions, sum)]

def short(prompts, completions, completion_ids, **kwargs):
    return [None if not ids else float(len(ids) <= 2) for ids in completion_ids]

def raises_on_eight(prompts, completions, a, **kwargs):
    return [1.0 / (a_ - 8) for a_ in a]

def too_few(prompts, completions, **kwargs):
    return [1.0]

def nan(prompts, completions, **kwargs):
    return [math.nan for _ in completions]

def text(prompts, completions, **kwargs):
    return ["good" for _ in completions]

def nothing(prompts, completions, **kwargs):
    return [None for _ in completions]
'''


@pytest.fixture
def reward_module(tmp_path):
    (tmp_path / "user_rewards.py").write_text(REWARDS)
    return str(tmp_path / "user_rewards.py")


def call(reward, completions, ids, columns, input_ids):
    return reward(["p"] * len(completions), completions, [["r"]] * len(completions), columns=columns,
                  input_ids=input_ids, output_ids=ids)


def test_weighted_rewards_and_none_as_trl_treats_it(reward_module):
    """reward = sum_i w_i r_i over the functions that scored (TRL's nansum); each is a component."""
    reward = build_python_reward([f"{reward_module}:correct", f"{reward_module}:short"], [1.0, 0.5])
    columns = [{"sum": "3"}, {"sum": "3"}, {"sum": "7"}]
    got = call(reward, ["3", "4", ""], [[5], [5, 6, 7], []], columns, [0, 0, 1])
    assert [r.value for r in got] == [1.0 + 0.5 * 1.0, 0.0 + 0.5 * 0.0, 0.0]  # the third: short is None
    assert got[0].components == {"correct": 1.0, "short": 1.0}
    assert got[2].components["correct"] == 0.0 and math.isnan(got[2].components["short"])
    nothing = build_python_reward([f"{reward_module}:nothing"])
    assert [r.value for r in call(nothing, ["x"], [[1]], [{}], [3])] == [0.0]  # every function None: 0 (fidelity.md)


@pytest.mark.parametrize("function, message", [
    ("raises_on_eight", r"reward function raises_on_eight raised ZeroDivisionError: float division by zero on "
                        r"input 11 \(completion 'y'\)"),
    ("too_few", r"reward function too_few returned 1 rewards for 2 completions \(inputs \[10, 11\]\)"),
    ("nan", r"reward function nan returned nan for input 10: a reward must be finite"),
    ("text", r"reward function text returned 'good' \(str\) for input 10: a reward is a number or None"),
])
def test_a_failing_reward_is_one_line_naming_function_input_and_problem(reward_module, function, message):
    reward = build_python_reward([f"{reward_module}:{function}"])
    with pytest.raises(RewardFunctionError, match=message):
        call(reward, ["x", "y"], [[1], [2]], [{"a": 1}, {"a": 8}], [10, 11])


def test_reward_functions_are_checked_at_validation(tmp_path, reward_module):
    data = write_jsonl(tmp_path / "data.jsonl", ROWS)
    base = {"task": "dataset", "dataset": {"path": data, "prompt": "q", "answer": "sum"}}
    cases = [({"reward_functions": [f"{reward_module}:missing"]}, r"defines no function 'missing'"),
             ({"reward_functions": [str(tmp_path / "nope.py") + ":f"]}, r"no such file"),
             ({"reward_functions": ["no_such_module_anywhere:f"]}, r"module 'no_such_module_anywhere' cannot be imported"),
             ({"reward_functions": ["correct"]}, r"is not 'file.py:function' or 'module:function'"),
             ({"reward_functions": [f"{reward_module}:correct"], "reward_weights": [1, 2]},
              r"reward_weights has 2 weight\(s\) for 1 reward function\(s\)"),
             ({"reward_weights": [1.0]}, r"reward_weights weigh reward_functions, and none are given"),
             ({"reward_functions": [f"{reward_module}:correct"], "reward": "exact_match"},
              r"reward = 'exact_match' and reward_functions are both given")]
    for extra, message in cases:
        with pytest.raises(pydantic.ValidationError, match=message):
            ExtractConfig(**base, **extra)


def test_extract_on_a_dataset_with_reward_functions_writes_components(tmp_path, reward_module):
    data = write_jsonl(tmp_path / "data.jsonl", ROWS)
    config = ExtractConfig(model="builtin:tiny-gpt2", task="dataset", num_inputs=3, num_samples_per_input=2,
                           dataset={"path": data, "prompt": "q", "answer": "sum"},
                           reward_functions=[f"{reward_module}:correct", f"{reward_module}:short"],
                           generation={"max_new_tokens": 3})
    from workloads.text.extract import run_extract

    run_extract(config, local_context(str(tmp_path / "results"), show_progress=False))
    samples = read_local_table(str(tmp_path / "results"), "samples").to_dict("records")
    assert len(samples) == 6
    for row in samples:
        components = dict(row["reward_components"])
        assert set(components) == {"correct", "short"}
        assert row["reward"] == components["correct"] + (0 if math.isnan(components["short"]) else components["short"])
        assert components["short"] == float(len(row["output_token_ids"]) <= 2)
    assert {r["prompt"] for r in samples} <= {r["q"] for r in ROWS}


# ---------------------------------------------------------------------------
# reasoning-gym
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("name, args", [("basic_arithmetic", {"min_terms": 2, "max_terms": 2}),
                                        ("chain_sum", {"min_terms": 2, "max_terms": 3}),
                                        ("gsm_symbolic", {})])
def test_reasoning_gym_tasks_are_its_items_scored_by_its_own_scorer(name, args):
    import reasoning_gym
    from reasoning_gym.utils import extract_answer

    from workloads.text.reasoning_gym_task import SPLIT_SEEDS, SPLIT_SIZES

    config = ExtractConfig(task=f"rg:{name}", task_args=args)
    task = task_of(config)
    theirs = reasoning_gym.create_dataset(name, seed=SPLIT_SEEDS["validation"], size=SPLIT_SIZES["validation"], **args)
    [ex] = task.examples("validation", [17])
    assert ex.source == theirs[17]["question"] and ex.target == str(theirs[17]["answer"])
    assert task.examples("train", [17])[0].source != ex.source  # the splits are apart
    reward = reward_of(config, task)
    outputs = [f"so <answer>{ex.target}</answer>", "<answer>-1</answer>", ex.target]
    got = reward(["p"] * 3, outputs, [[ex.target]] * 3, columns=[task.columns(ex)] * 3)
    expected = [theirs.score_answer(extract_answer(o), theirs[17]) for o in outputs]
    assert [r.value for r in got] == expected and expected[0] == 1.0 and expected[2] == 0.0
    assert [r.components["format"] for r in got] == [1.0, 1.0, 0.0]


def test_reasoning_gym_inputs_are_the_same_in_a_fresh_process():
    code = ("from workloads.text.tasks import task_named, TaskOptions;"
            "t = task_named('rg:chain_sum', TaskOptions(task_args_json='{}'));"
            "print(t.examples('train', [1234])[0].source)")
    fresh = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO,
                           env={**os.environ, "PYTHONHASHSEED": "123"}, timeout=120)
    assert fresh.returncode == 0, fresh.stderr[-2000:]
    here = task_of(ExtractConfig(task="rg:chain_sum")).examples("train", [1234])[0].source
    assert fresh.stdout.strip() == here


@pytest.mark.parametrize("values, message", [
    ({"task": "rg:no_such_dataset"}, r"unknown reasoning-gym dataset 'no_such_dataset'"),
    ({"task": "rg:chain_sum", "task_args": {"bogus": 1}}, r"task_args = \{'bogus': 1\} for rg:chain_sum: "
                                                          r"reasoning-gym refuses them \(TypeError"),
    ({"task": "rg:chain_sum", "task_args": {"seed": 1}}, r"rlgrad sets a reasoning-gym dataset's seed and size"),
    ({"task": "rg:knight_swap"}, r"does not generate its item i from \(seed, i\) alone"),
])
def test_bad_reasoning_gym_tasks_are_one_line(values, message):
    with pytest.raises(pydantic.ValidationError, match=message):
        ExtractConfig(**values)


# ---------------------------------------------------------------------------
# the chat template and the system prompt
# ---------------------------------------------------------------------------

def test_chat_template_switch_and_system_prompt():
    from workloads.text.models import chat_formatted
    from transformers import AutoTokenizer

    from workloads.text.packaged_models import ensure_converted

    plain = type("Plain", (), {"chat_template": None})()
    assert chat_formatted(plain, ["2+2?"]) is None
    assert chat_formatted(plain, ["2+2?"], system_prompt="Be brief.") == ["Be brief.\n\n2+2?"]
    with pytest.raises(ValueError, match="chat_template = 'on', and this model's tokenizer has no chat template"):
        chat_formatted(plain, ["2+2?"], "on")
    tokenizer = AutoTokenizer.from_pretrained(ensure_converted("builtin:smollm2-135m-instruct"))
    [templated] = chat_formatted(tokenizer, ["2+2?"], "auto", "Be brief.")
    assert templated.index("Be brief.") < templated.index("2+2?") and templated.endswith("assistant\n")
    assert "<|im_start|>system" in templated
    assert chat_formatted(tokenizer, ["2+2?"], "off") is None


# ---------------------------------------------------------------------------
# zero_std_tolerance
# ---------------------------------------------------------------------------

def test_zero_std_tolerance_in_tables_monitors_and_mitigations():
    import torch

    from workloads.text.grpo import predicted_zero_std
    from workloads.text.sampling import Group, Prompts, ScoredSamples, is_zero_std, table_rows
    from workloads.text.task_base import Reward

    rewards = [0.5, 0.5 + 2e-7, 0.5, 0.5]  # std (1/K) = 8.66e-8
    scored = ScoredSamples.of(4, [[1]] * 4, ["a"] * 4, [Reward(r) for r in rewards])
    prompts = Prompts(["p"], [[1]], [["r"]], [{}], [0])
    group = Group(0, None, prompts, scored)
    assert group.std == pytest.approx(8.660254e-8, rel=1e-5)
    assert not group.zero_std() and group.zero_std(1e-6) and not group.zero_std(1e-8)
    example = type("Ex", (), {"input_id": 0})()
    for tolerance, expected in [(0.0, False), (1e-6, True)]:
        _, [row] = table_rows(0, [example], prompts, scored, [0.0] * 4, [None], "m", "d", tolerance)
        assert row["reward_std_zero"] is expected
    assert is_zero_std(0.0) and not is_zero_std(1e-12)
    history = [(0.5, 1e-9), (0.5, 0.0)]
    assert not predicted_zero_std(history, 2) and predicted_zero_std(history, 2, 1e-6)
    assert torch.equal(group.rewards, torch.tensor(rewards, dtype=torch.float64))


def test_equal_continuous_rewards_have_std_exactly_zero():
    """Measured on the shipped sweep: eight rewards of 0.1 (a weighted sum of reward functions)
    were stored as reward_std 1.4e-17, not zero-std, because numpy's segmented mean of them is
    0.09999999999999999. K equal rewards must have std exactly 0, on the workers and in the
    aggregated table, without a tolerance."""
    import numpy as np
    import pyarrow as pa
    import torch

    from orchestrator.aggregate import _hash_stats, _segment_stats
    from workloads.text.gradnorm import reward_stats

    rewards = np.array([0.1] * 8 + [0.1] * 7 + [1.1])
    assert np.add.reduceat(rewards, [0, 8])[0] / 8 != 0.1  # the residue the stds inherit
    expected = math.sqrt(7) / 8  # one reward 1 above seven equal ones: std (1/K) = sqrt(7)/8
    keys = np.repeat([0, 1], 8)
    segment = _segment_stats([keys], np.tile(np.arange(8), 2), rewards)
    hashed = _hash_stats(pa.table({"k": keys, "sample_idx": np.tile(np.arange(8), 2), "reward": rewards}), ["k"])
    worker = reward_stats(torch.tensor(rewards.reshape(2, 8)))[1].numpy()
    for std in (segment["std"], hashed["std"], worker):
        assert std[0] == 0.0 and std[1] == pytest.approx(expected, rel=1e-12)
    assert segment["std_unbiased"][0] == 0.0 and hashed["std_unbiased"][0] == 0.0
    from workloads.text.gradnorm import leave_one_out_advantages

    four = torch.tensor([[0.1] * 4, [0.1, 0.1, 0.1, 1.1]], dtype=torch.float64)
    assert (torch.tensor([0.4], dtype=torch.float64) - 0.1).item() / 3 != 0.1  # the residue, measured as 2.6e-15 norms
    advantages = leave_one_out_advantages(four)
    assert advantages[0].tolist() == [0.0] * 4
    assert advantages[1].tolist() == pytest.approx([-1 / 3, -1 / 3, -1 / 3, 1.0], rel=1e-12)


def test_the_example_folder_loads_as_a_user_would_write_it():
    """examples/times_tables: the JSONL and the 10-line reward module the README shows."""
    folder = os.path.join(REPO, "examples", "times_tables")
    config = ExtractConfig(task="dataset", dataset={"path": os.path.join(folder, "questions.jsonl"),
                                                    "prompt": "question", "answer": "answer"},
                           reward_functions=[os.path.join(folder, "rewards.py") + ":correct",
                                             os.path.join(folder, "rewards.py") + ":brief"],
                           reward_weights=[1.0, 0.1])
    task = task_of(config)
    [ex] = task.examples("train", [0])
    reward = reward_of(config, task)
    got = reward([ex.source] * 3, [f"{ex.target}.", "I think 1", ""], [[ex.target]] * 3,
                 columns=[task.columns(ex)] * 3, input_ids=[0] * 3, output_ids=[[1]] * 3)
    assert [r.value for r in got] == [1.1, 0.1, 0.0]
    with open(os.path.join(folder, "rewards.py")) as f:
        assert len([line for line in f if line.strip()]) <= 12


def test_sft_and_ppo_run_on_a_dataset_task_with_reward_functions(tmp_path, reward_module):
    """The other two workloads on the user's data: SFT on the completion field (the file has no
    validation split: no held-out evaluation), PPO with the Python rewards."""
    from workloads.text.ppo import run_ppo
    from workloads.text.ppo_config import PPOConfig
    from workloads.text.sft import run_sft
    from workloads.text.sft_config import SFTConfig

    rows = [dict(r, worked=f"{r['a']} + {r['b']} = {r['sum']}") for r in ROWS]
    data = {"path": write_jsonl(tmp_path / "data.jsonl", rows), "prompt": "q", "answer": "sum", "completion": "worked"}
    sft_ctx = local_context(str(tmp_path / "sft"), show_progress=False)
    metrics = run_sft(SFTConfig.model_validate({"task": "dataset", "dataset": data, "max_steps": 2, "batch_size": 4,
                                                "log_every_steps": 1, "references": "first"}), sft_ctx)
    assert metrics["step"] == 2 and "eval_reward_mean" not in metrics
    ppo_ctx = local_context(str(tmp_path / "ppo"), show_progress=False)
    run_ppo(PPOConfig.model_validate({"task": "dataset", "dataset": data, "num_train_inputs": 5, "num_eval_inputs": 2,
                                      "inputs_per_rollout": 2, "num_samples_per_input": 2, "rollout_tokens": None,
                                      "num_rollouts": 1, "minibatch_size": 4, "generation": {"max_new_tokens": 3},
                                      "reward_functions": [f"{reward_module}:short"]}), ppo_ctx)
    samples = read_local_table(str(tmp_path / "ppo"), "samples").to_dict("records")
    assert samples and all(set(dict(r["reward_components"])) == {"short"} for r in samples)
    assert all(r["reward"] == (0.0 if len(r["output_token_ids"]) == 0 else float(len(r["output_token_ids"]) <= 2))
               for r in samples)
