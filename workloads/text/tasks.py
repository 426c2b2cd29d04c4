"""Text tasks: one registry every LM workload gets its inputs, prompts and rewards from.

    task = task_of(config)                   # the config's task bound to its data (cached per process)
    task.split_size(split) -> int
    task.examples(split, indices) -> [example: input_id, source, target, references?, columns?]
    task.choose_inputs(split, num_inputs, seed) -> [input index]
    task.prompt_text(example, is_encoder_decoder) -> str   # what the model is conditioned on
    task.references(example) -> [str]                      # everything the reward compares against
    task.train_references(example) -> [str]                # what SFT trains on (one example per reference)
    task.columns(example) -> {field: value}                # the row a Python reward function sees
    task.truncation_side(setting, encoder_decoder, stage) -> 'left' | 'right'
    task.default_reward, task.default_reward_args          # what `reward: task` means

Where tasks come from (`_sources()`, the one place they are registered):
  * workloads/text/builtin_task.py   `reverse`, offline, no data;
  * workloads/text/math_tasks.py     `arithmetic_d1..5`, `word_problems_d1..3`, offline, exact 0/1 reward;
  * workloads/text/grue.py           the seven GRUE tasks, from the hub or `dataset_path`;
  * workloads/text/dataset_task.py   `task: dataset`: any dataset (hub id, .jsonl/.json/.parquet/.csv,
                                     a save_to_disk directory) described by the config's `dataset:` block;
  * workloads/text/reasoning_gym_task.py  `rg:<name>`: any reasoning-gym dataset, `task_args` its generator's.

A source exposes NAMES (exact task names) and/or PREFIX (a family of names), and
`make_task(name, options) -> Task`. This module is light to import (no torch, no
datasets, no transformers, no reasoning_gym): the configs check a task and its reward
while they are validated.
"""

from __future__ import annotations

import functools
import json

from .rewards import check_reward_available
from .task_base import TASK_REWARD, Task, TaskOptions, TextExample  # noqa: F401 (the tasks' interface)


# ---------------------------------------------------------------------------
# the registry
# ---------------------------------------------------------------------------

def _sources():
    from . import builtin_task, dataset_task, grue, math_tasks, reasoning_gym_task

    return (builtin_task, math_tasks, grue, dataset_task, reasoning_gym_task)


@functools.lru_cache(maxsize=1)
def _registry() -> tuple[dict, dict]:
    names, prefixes = {}, {}
    for source in _sources():
        for name in getattr(source, "NAMES", ()):
            names[name] = source
        if getattr(source, "PREFIX", None):
            prefixes[source.PREFIX] = source
    return names, prefixes


def task_names() -> list[str]:
    """Every exact task name, and each family as '<prefix><name>'."""
    names, prefixes = _registry()
    return [*names, *(f"{p}<name>" for p in prefixes)]


def _source_of(name: str):
    names, prefixes = _registry()
    if name in names:
        return names[name]
    for prefix, source in prefixes.items():
        if name.startswith(prefix):
            return source
    raise ValueError(f"unknown task {name!r}; allowed: {task_names()}")


@functools.lru_cache(maxsize=64)
def task_named(name: str, options: TaskOptions = TaskOptions()) -> Task:
    """The task `name` bound to `options` (one object per process and options: data is read once)."""
    return _source_of(name).make_task(name, options)


def options_of(config) -> TaskOptions:
    dataset = getattr(config, "dataset", None)
    return TaskOptions(
        dataset_path=getattr(config, "dataset_path", None),
        task_args_json=json.dumps(getattr(config, "task_args", None) or {}, sort_keys=True),
        dataset_json=None if dataset is None else json.dumps(
            dataset.model_dump(mode="json") if hasattr(dataset, "model_dump") else dataset, sort_keys=True),
    )


def task_of(config) -> Task:
    """The task of a text workload config (its `task`, `dataset_path`, `task_args`, `dataset`)."""
    return task_named(config.task, options_of(config))


def check_task_and_reward(config) -> Task:
    """What the workload configs run when validated: the task exists, takes the options given,
    and its reward can run here (workloads.rewards.check_reward_available). Returns the task,
    whose `check_data` the config runs after the model's check."""
    source = _source_of(config.task)
    options = options_of(config)
    if options.task_args and not getattr(source, "TAKES_TASK_ARGS", False):
        raise ValueError(f"task_args = {options.task_args}: task {config.task!r} takes none "
                         "(reasoning-gym tasks, rg:<name>, take their generator's arguments)")
    if options.dataset is not None and not getattr(source, "TAKES_DATASET", False):
        raise ValueError(f"dataset: the `dataset` block describes `task: dataset`, and task is {config.task!r}")
    task = task_named(config.task, options)
    if not getattr(config, "reward_functions", None):
        check_reward_available(*task.resolve_reward(config.reward, config.reward_args))
    return task


def reward_of(config, task: Task | None = None):
    """The reward function a config asks for: its Python reward functions, or a named reward
    (`reward: task` = the task's own). Functions that take the row's columns say so
    (`takes_columns`), and sampling.score_outputs passes them."""
    if getattr(config, "reward_functions", None):
        from .python_rewards import build_python_reward

        return build_python_reward(config.reward_functions, config.reward_weights)
    from .rewards import get_reward

    task = task or task_of(config)
    return get_reward(*task.resolve_reward(config.reward, config.reward_args))
