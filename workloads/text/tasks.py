"""Text tasks by name: where every LM workload gets its inputs, prompts and rewards.

    get_examples(task, split, indices, dataset_path=None) -> [example: input_id, source, target, references?]
    split_size(task, split, dataset_path=None) -> int
    choose_inputs(task, split, num_inputs, seed, dataset_path=None) -> [input index]
    prompt_text(task, example, is_encoder_decoder) -> str   # what the model is conditioned on
    references(task, example) -> [str]                      # everything the reward compares against
    train_references(task, example) -> [str]                # what SFT trains on (one example per reference)
    truncation_side(task, setting, encoder_decoder, stage) -> 'left' | 'right'  # the reference's cut per stage
    default_reward(task) -> name of the task's reward in workloads.rewards
    default_reward_args(task) -> that reward's arguments (IWSLT: tokenize intl, IMDB: the classifier)
    resolve_reward(task, reward, reward_args) -> (name, args)  # a config's `reward: task` made concrete

Tasks: the built-in offline `reverse` (workloads/text/builtin_task.py), the
verifiable-reward math tasks `arithmetic_d1..d5` and `word_problems_d1..d3`
(workloads/text/math_tasks.py, offline, exact 0/1 reward), and the seven
GRUE tasks (workloads/text/grue.py), which read the hub or a local copy given by
`dataset_path` (ignored by `reverse`, which needs no data).

This module is light to import (no torch, no datasets, no transformers), so the
configs can check a task and its reward while they are validated.
"""

from __future__ import annotations

from . import builtin_task, grue, math_tasks
from .rewards import check_reward_available

BUILTIN_TASKS = ("reverse",)
MATH_TASKS = math_tasks.MATH_TASKS
TASKS = (*BUILTIN_TASKS, *MATH_TASKS, *grue.GRUE_TASKS)
TASK_REWARD = "task"  # the config value that means "this task's default reward"


def _check(task: str) -> None:
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; allowed: {list(TASKS)}")


def get_examples(task: str, split: str, indices: list[int], dataset_path: str | None = None):
    _check(task)
    if task in BUILTIN_TASKS:
        return builtin_task.get_examples(task, split, indices)
    if task in MATH_TASKS:
        return math_tasks.get_examples(task, split, indices)
    return grue.get_examples(task, split, indices, dataset_path)


def split_size(task: str, split: str, dataset_path: str | None = None) -> int:
    _check(task)
    if task in BUILTIN_TASKS:
        return builtin_task.split_size(task, split)
    if task in MATH_TASKS:
        return math_tasks.split_size(task, split)
    return grue.split_size(task, split, dataset_path)


def choose_inputs(task: str, split: str, num_inputs: int, seed: int, dataset_path: str | None = None) -> list[int]:
    _check(task)
    if task in BUILTIN_TASKS:
        return builtin_task.choose_inputs(task, split, num_inputs, seed)
    if task in MATH_TASKS:
        return math_tasks.choose_inputs(task, split, num_inputs, seed)
    return grue.choose_inputs(task, split, num_inputs, seed, dataset_path)


def prompt_text(task: str, example, is_encoder_decoder: bool) -> str:
    _check(task)
    if task in BUILTIN_TASKS:
        return builtin_task.prompt_text(example.source, is_encoder_decoder)
    # math and GRUE prompts are the same text for both model kinds: T5 tasks carry their
    # prefix, GPT-2 tasks (DailyDialog, IMDB) are continuations of the prompt
    return example.source


def references(task: str, example) -> list[str]:
    """All reference outputs of an example (the built-in task has exactly one)."""
    return list(getattr(example, "references", None) or [example.target])


def train_references(task: str, example) -> list[str]:
    """What SFT trains on: every reference of the example (the reference's SFT
    datapool; IMDB's is the second half of the review, not the full review)."""
    return list(getattr(example, "train_references", None) or references(task, example))


def truncation_side(task: str, setting: str, encoder_decoder: bool, stage: str = "extract") -> str:
    """'left' or 'right': which end of a too-long prompt is cut.

    setting 'task' means the reference's side for this task and stage: extraction
    and SFT use the config's tokenizer.truncation_side (grue.REFERENCE_TRUNCATION_SIDE),
    PPO the environment's prompt_truncation_side (grue.PPO_PROMPT_TRUNCATION_SIDE,
    e.g. DailyDialog: right in extraction and SFT, left in PPO). The built-in task
    keeps a causal prompt's end and an encoder prompt's beginning."""
    _check(task)
    if setting in ("left", "right"):
        return setting
    if setting != "task":
        raise ValueError(f"truncation_side={setting!r}; allowed: 'task', 'left', 'right'")
    if stage not in ("extract", "sft", "ppo"):
        raise ValueError(f"stage={stage!r}; allowed: 'extract', 'sft', 'ppo'")
    if task in BUILTIN_TASKS or task in MATH_TASKS:  # no reference config: keep where the answer starts
        return "right" if encoder_decoder else "left"
    table = grue.PPO_PROMPT_TRUNCATION_SIDE if stage == "ppo" else grue.REFERENCE_TRUNCATION_SIDE
    return table[task]


def default_reward(task: str) -> str:
    _check(task)
    if task in MATH_TASKS:
        return "math_answer"
    return task if task in BUILTIN_TASKS else grue.DEFAULT_REWARDS[task][0]


def default_reward_args(task: str) -> dict:
    _check(task)
    return {} if task in (*BUILTIN_TASKS, *MATH_TASKS) else dict(grue.DEFAULT_REWARDS[task][1])


def resolve_reward(task: str, reward: str = TASK_REWARD, reward_args: dict | None = None) -> tuple[str, dict]:
    """(reward name, arguments) of a config: `reward: task` is the task's default
    reward with its default arguments; a named reward takes `reward_args` as given."""
    if reward == TASK_REWARD:
        if reward_args:
            raise ValueError("reward_args needs an explicit reward name (reward: task takes the task's "
                             f"default arguments {default_reward_args(task)})")
        return default_reward(task), default_reward_args(task)
    return reward, dict(reward_args or {})


def check_task_and_reward(task: str, reward: str = TASK_REWARD, reward_args: dict | None = None) -> None:
    """What the workload configs run when validated: the task exists and its
    reward can run here (see workloads.rewards.check_reward_available)."""
    _check(task)
    check_reward_available(*resolve_reward(task, reward, reward_args))
