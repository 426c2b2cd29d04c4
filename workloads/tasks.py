"""Text tasks by name: where every LM workload gets its inputs, prompts and default reward.

    get_examples(task, split, indices) -> [Example(input_id, source, target, references)]
    split_size(task, split) -> int
    choose_inputs(task, split, num_inputs, seed) -> [input index]
    prompt_text(task, example, is_encoder_decoder) -> str   # what the model is conditioned on
    default_reward(task) -> name of the reward registered in workloads.rewards

The built-in offline task is `reverse` (workloads/text_task.py); the GRUE
tasks register here too.
"""

from __future__ import annotations

from . import text_task

BUILTIN = {"reverse": text_task}


def _module(task: str):
    if task not in BUILTIN:
        raise ValueError(f"unknown task {task!r}; allowed: {sorted(BUILTIN)}")
    return BUILTIN[task]


def get_examples(task: str, split: str, indices: list[int]):
    return _module(task).get_examples(task, split, indices)


def split_size(task: str, split: str) -> int:
    return _module(task).split_size(task, split)


def choose_inputs(task: str, split: str, num_inputs: int, seed: int) -> list[int]:
    return _module(task).choose_inputs(task, split, num_inputs, seed)


def prompt_text(task: str, example, is_encoder_decoder: bool) -> str:
    return _module(task).prompt_text(example.source, is_encoder_decoder)


def references(task: str, example) -> list[str]:
    """All reference outputs of an example (the built-in task has exactly one)."""
    return list(getattr(example, "references", None) or [example.target])


def default_reward(task: str) -> str:
    _module(task)
    return task
