"""`task: rg:<name>`: any dataset of reasoning-gym (procedural, offline, verifiable) as a task.

    task: rg:basic_arithmetic
    task_args: {min_terms: 2, max_terms: 3}     # the dataset's own config fields (its generator's arguments)
    system_prompt: ...                          # reasoning-gym scores the text inside <answer>...</answer>

Input i of a split is reasoning-gym's item i of a dataset created with that split's seed:
its generators seed item i alone (reasoning_gym/dataset.py ProceduralDataset; e.g.
arithmetic/basic_arithmetic.py __getitem__ draws from Random(self.seed + idx)), so every
worker regenerates the same input from (name, task_args, split, i). The splits' seeds lie
SPLIT_SEED_GAP apart, so no item of one split is an item of another.

The reward (`reasoning_gym`) is the dataset's own `score_answer(answer, entry)` of the
answer `reasoning_gym.utils.extract_answer` reads from the completion's last
<answer>...</answer> (None without one), as reasoning-gym's own evaluation scores it.
Its system prompts (reasoning_gym.utils.SYSTEM_PROMPTS) ask for that tag; rlgrad applies
none by itself: name one in `system_prompt` (the shipped sweep uses its "default").
"""

from __future__ import annotations

import functools

from ..core.availability import RewardNotAvailableError
from .task_base import Reward, Task, TextExample

PREFIX = "rg:"  # registered in workloads/text/tasks.py
TAKES_TASK_ARGS = True
SPLIT_SIZES = {"train": 20_000, "validation": 2_000, "test": 2_000}  # word_ladder refuses more than 20,000
SPLIT_SEED_GAP = 10**9  # item i of split s is Random(seed_s + i): 10^9 apart, the splits never meet
SPLIT_SEEDS = {split: n * SPLIT_SEED_GAP for n, split in enumerate(SPLIT_SIZES)}
INSTALL = "pip install -e '.[reasoning-gym]' (reasoning-gym==0.1.25)"
# datasets whose item i is NOT a function of (seed, i, arguments) alone in 0.1.25 -- measured: it changes with
# the items generated before (knight_swap), with PYTHONHASHSEED (word_ladder, isomorphic_strings, ransom_note)
# or from run to run (polynomial_multiplication). Workers regenerate inputs independently, so these would give
# two workers two different inputs under one input_id.
NOT_PER_INDEX = ("isomorphic_strings", "knight_swap", "polynomial_multiplication", "ransom_note", "word_ladder")


def _reasoning_gym():
    try:
        import reasoning_gym
    except ImportError:
        raise RewardNotAvailableError(f"rg:<name> tasks need the reasoning-gym package: {INSTALL}") from None
    return reasoning_gym


def dataset_names() -> list[str]:
    _reasoning_gym()  # installed, or one line saying how
    from reasoning_gym.factory import DATASETS

    return sorted(DATASETS)


@functools.lru_cache(maxsize=32)
def _dataset(name: str, config_json: str, split: str):
    import json

    rg = _reasoning_gym()
    return rg.create_dataset(name, **json.loads(config_json), seed=SPLIT_SEEDS[split], size=SPLIT_SIZES[split])


def make_dataset(name: str, config: dict, split: str):
    """reasoning-gym's dataset `name` with the generator arguments `config`, for our `split`;
    a wrong name or argument is one line."""
    import json

    if split not in SPLIT_SIZES:
        raise ValueError(f"unknown split {split!r}; allowed: {sorted(SPLIT_SIZES)}")
    reserved = sorted({"seed", "size"} & set(config))
    if reserved:
        raise ValueError(f"task_args {reserved}: rlgrad sets a reasoning-gym dataset's seed and size "
                         "(per split; input i is its item i)")
    names = dataset_names()
    if name not in names:
        raise ValueError(f"unknown reasoning-gym dataset {name!r} (task rg:{name}); it has {len(names)}, "
                         f"e.g. basic_arithmetic, chain_sum, gsm_symbolic, leg_counting")
    if name in NOT_PER_INDEX:
        raise ValueError(f"rg:{name}: reasoning-gym 0.1.25 does not generate its item i from (seed, i) alone "
                         f"(measured: {', '.join(NOT_PER_INDEX)}), so workers would disagree on the inputs")
    try:
        return _dataset(name, json.dumps(config, sort_keys=True), split)
    except (TypeError, ValueError, AssertionError) as error:
        raise ValueError(f"task_args = {config} for rg:{name}: reasoning-gym refuses them "
                         f"({type(error).__name__}: {error})") from None


class ReasoningGymTask(Task):
    default_reward = "reasoning_gym"

    def __init__(self, name: str, options):
        super().__init__(name, options)
        self.dataset_name = name[len(PREFIX):]
        self.config = options.task_args
        self.default_reward_args = {"dataset": self.dataset_name, "config": self.config}

    def check_data(self) -> None:
        make_dataset(self.dataset_name, self.config, "train")

    def split_size(self, split: str) -> int:
        return len(make_dataset(self.dataset_name, self.config, split))

    def examples(self, split: str, indices: list[int]) -> list[TextExample]:
        dataset = make_dataset(self.dataset_name, self.config, split)
        examples = []
        for index in indices:
            if not 0 <= index < len(dataset):
                raise IndexError(f"input {index} out of range for split {split!r} of {self.name!r} ({len(dataset)})")
            entry = dataset[index]
            examples.append(TextExample(index, entry["question"], str(entry["answer"]), (str(entry["answer"]),),
                                        columns=dict(entry)))
        return examples


def make_task(name: str, options) -> ReasoningGymTask:
    return ReasoningGymTask(name, options)


# ---------------------------------------------------------------------------
# the reward: reasoning-gym's own scorer
# ---------------------------------------------------------------------------

def build_reasoning_gym(dataset: str, config: dict | None = None):
    """The dataset's score_answer of the completion's <answer> text, with the input's entry
    (its columns: question, answer, metadata); one component, `score`."""
    from reasoning_gym.utils import extract_answer

    scorer = make_dataset(dataset, dict(config or {}), "train")

    def reasoning_gym(prompts, outputs, references, columns=None, input_ids=None, output_ids=None) -> list[Reward]:
        if columns is None:
            raise ValueError("the reasoning_gym reward scores with the input's entry: use it with an rg:<name> task")
        rewards = []
        for output, entry in zip(outputs, columns, strict=True):
            score = float(scorer.score_answer(extract_answer(output), entry))
            rewards.append(Reward(score, {"score": score, "format": float(extract_answer(output) is not None)}))
        return rewards

    reasoning_gym.takes_columns = True
    return reasoning_gym


def check_reasoning_gym(args: dict) -> None:
    _reasoning_gym()
    try:
        make_dataset(args["dataset"], dict(args.get("config") or {}), "train")
    except ValueError as error:
        raise RewardNotAvailableError(f"reward 'reasoning_gym': {error}") from None
