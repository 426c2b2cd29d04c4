"""What every text task is: the `Task` interface the sources implement (workloads/text/tasks.py
registers them), the options a config binds a task to, the example most sources return, and
the `Reward` every reward function returns per output. Torch-free."""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field


@dataclass
class Reward:
    value: float
    components: dict[str, float] = field(default_factory=dict)


TASK_REWARD = "task"  # the config value that means "this task's default reward"


@dataclass(frozen=True)
class TaskOptions:
    """What a config says about its task's data beside the name (hashable: tasks are cached by it)."""

    dataset_path: str | None = None  # GRUE: a local copy
    task_args_json: str = "{}"  # reasoning-gym: the generator's arguments
    dataset_json: str | None = None  # task: dataset -- the `dataset:` block

    @property
    def task_args(self) -> dict:
        return json.loads(self.task_args_json)

    @property
    def dataset(self) -> dict | None:
        return None if self.dataset_json is None else json.loads(self.dataset_json)


class Task:
    """A text task bound to its data. Sources override what differs from these defaults."""

    default_reward: str = "exact_match"
    default_reward_args: dict = {}

    def __init__(self, name: str, options: TaskOptions):
        self.name, self.options = name, options

    # -- data ---------------------------------------------------------------------
    def split_size(self, split: str) -> int:
        raise NotImplementedError

    def examples(self, split: str, indices: list[int]) -> list:
        raise NotImplementedError

    def has_split(self, split: str) -> bool:
        return True

    def check_data(self) -> None:
        """At validation: the data can be read here (one line naming what and how to fix, else)."""

    def choose_inputs(self, split: str, num_inputs: int, seed: int) -> list[int]:
        """`num_inputs` distinct input ids of the split, drawn with `seed` (paper: seed 7)."""
        size = self.split_size(split)
        if num_inputs > size:
            raise ValueError(f"asked for {num_inputs} inputs but split {split!r} of {self.name!r} has {size}")
        return random.Random(seed).sample(range(size), num_inputs)

    # -- what the model sees and the reward compares against ----------------------------
    def prompt_text(self, example, is_encoder_decoder: bool) -> str:
        return example.source

    def references(self, example) -> list[str]:
        return list(getattr(example, "references", None) or [example.target])

    def train_references(self, example) -> list[str]:
        """What SFT trains on: every reference of the example unless the task says otherwise."""
        return list(getattr(example, "train_references", None) or self.references(example))

    def columns(self, example) -> dict:
        """The example's fields as a Python reward function receives them (TRL: the dataset row)."""
        return dict(getattr(example, "columns", None) or {"answer": example.target})

    def sft_loss_on_reference_only(self) -> bool:
        """Whether SFT, by default, scores only the reference and appends EOS (the built-in task)."""
        return False

    def reference_truncation_side(self, encoder_decoder: bool, stage: str) -> str:
        """The side the reference cuts a too-long prompt for this task and stage; tasks without a
        reference config keep where the answer starts (a causal prompt's end, an encoder prompt's start)."""
        return "right" if encoder_decoder else "left"

    def truncation_side(self, setting: str, encoder_decoder: bool, stage: str = "extract") -> str:
        """'left' or 'right': which end of a too-long prompt is cut. setting 'task' means the
        reference's side for this task and stage (extract, sft, ppo)."""
        if setting in ("left", "right"):
            return setting
        if setting != "task":
            raise ValueError(f"truncation_side={setting!r}; allowed: 'task', 'left', 'right'")
        if stage not in ("extract", "sft", "ppo"):
            raise ValueError(f"stage={stage!r}; allowed: 'extract', 'sft', 'ppo'")
        return self.reference_truncation_side(encoder_decoder, stage)

    def resolve_reward(self, reward: str = TASK_REWARD, reward_args: dict | None = None) -> tuple[str, dict]:
        """(reward name, arguments): `reward: task` is the task's default reward with its default
        arguments; a named reward takes `reward_args` as given."""
        if reward == TASK_REWARD:
            if reward_args:
                raise ValueError("reward_args needs an explicit reward name (reward: task takes the task's "
                                 f"default arguments {self.default_reward_args})")
            return self.default_reward, dict(self.default_reward_args)
        return reward, dict(reward_args or {})


@dataclass(frozen=True)
class TextExample:
    """An input of a task: what most sources return."""

    input_id: int  # position of the input in its split
    source: str  # the full prompt text
    target: str  # the first reference (what SFT trains on by default)
    references: tuple[str, ...] = ()  # all references: what the rewards score against
    train_references: tuple[str, ...] | None = None  # SFT's references where they differ (IMDB); None = references
    columns: dict = field(default=None, compare=False, hash=False)  # the row, for Python reward functions
