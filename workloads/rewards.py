"""Rewards: a registry of batched reward functions.

A reward function takes parallel lists (prompts, outputs, references) and
returns one `Reward` per output: a float and its named components (stored in
the `samples` table). Batched because the GRUE rewards that slot in later are
batched (METEOR, SacreBLEU over a corpus, a learned classifier on a GPU);
`references` holds one reference string per output -- a task with several
references per input passes a list there and its reward takes the max.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable


@dataclass
class Reward:
    value: float
    components: dict[str, float] = field(default_factory=dict)


RewardFn = Callable[[list[str], list[str], list], list[Reward]]


def reverse_reward(prompts: list[str], outputs: list[str], references: list[str]) -> list[Reward]:
    """Built-in task reward, in [0, 1] and continuous so reward std varies per input.

    char_accuracy = #{i : output[i] == target[i]} / max(len(output), len(target))
      -- positional, so a shifted or too long/short answer loses credit;
    length_match  = 1 - |len(output) - len(target)| / max(len(output), len(target))
    The reward is char_accuracy (1 exactly when output == target).
    """
    rewards = []
    for output, target in zip(outputs, references, strict=True):
        longest = max(len(output), len(target))
        if longest == 0:
            char_accuracy = length_match = 1.0
        else:
            char_accuracy = sum(a == b for a, b in zip(output, target)) / longest
            length_match = 1.0 - abs(len(output) - len(target)) / longest
        rewards.append(Reward(char_accuracy, {"char_accuracy": char_accuracy, "length_match": length_match,
                                              "exact_match": float(output == target)}))
    return rewards


REWARDS: dict[str, RewardFn] = {
    "reverse": reverse_reward,
}


def get_reward(name: str) -> RewardFn:
    """The reward function registered under `name` (a task's default reward has the task's name)."""
    if name not in REWARDS:
        raise ValueError(f"unknown reward {name!r}; registered: {sorted(REWARDS)}")
    return REWARDS[name]
