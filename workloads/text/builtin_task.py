"""The built-in offline text task `reverse` (its tokenizer: workloads/text/tokenizer.py).

Input: a string of 1 to 12 lowercase letters; target: the same string reversed.
Input i of a split is a pure function of (split, i), so every worker, every
retry and every later stage sees the same data without a dataset file.

Why this task: lengths run from 1 to MAX_LENGTH, so a tiny model after a short
SFT solves the short strings almost always, never gets the long ones exactly
right, and is uncertain in between -- the spread of per-input reward mean and
std that the paper's scatter plots need. Measured with builtin:tiny-gpt2 after
300 SFT steps (lr 2e-3, batch 32), K=8 samples of 256 train inputs: 8% of the
inputs have reward_std < 0.01 (solved every time), mean reward falls from 0.94
(length 1) to about 0.25 (length >= 9, exact match ~never), most in between.

Prompt format
  causal   (GPT-2 family): "abc="  -> continuation "cba" + EOS
  seq2seq  (T5 family):    encoder "abc" -> decoder "cba" + EOS
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass

from .task_base import Task

TASK_NAME = "reverse"
NAMES = (TASK_NAME,)  # registered in workloads/text/tasks.py
ALPHABET = "abcdefghijklmnopqrstuvwxyz"  # 26**12 distinct long strings: validation inputs are unseen
MIN_LENGTH, MAX_LENGTH = 1, 12
SEPARATOR = "="  # ends a causal prompt: "the answer starts here"
SPLIT_SIZES = {"train": 50_000, "validation": 2_000, "test": 2_000}



@dataclass(frozen=True)
class Example:
    input_id: int  # index of the input in its split
    source: str
    target: str


def _example_rng(split: str, index: int) -> random.Random:
    # A hash of (task, split, index) -- not Python's salted hash() -- seeds the
    # generator, so the example is identical across processes and machines.
    digest = hashlib.sha256(f"{TASK_NAME}/{split}/{index}".encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "little"))


def reverse_example(split: str, index: int) -> Example:
    if split not in SPLIT_SIZES:
        raise ValueError(f"unknown split {split!r}; allowed: {sorted(SPLIT_SIZES)}")
    if not 0 <= index < SPLIT_SIZES[split]:
        raise IndexError(f"input {index} out of range for split {split!r} of size {SPLIT_SIZES[split]}")
    rng = _example_rng(split, index)
    length = rng.randint(MIN_LENGTH, MAX_LENGTH)
    source = "".join(rng.choice(ALPHABET) for _ in range(length))
    return Example(index, source, source[::-1])


class ReverseTask(Task):
    default_reward = "reverse"

    def split_size(self, split: str) -> int:
        if split not in SPLIT_SIZES:
            raise ValueError(f"unknown split {split!r}; allowed: {sorted(SPLIT_SIZES)}")
        return SPLIT_SIZES[split]

    def examples(self, split: str, indices: list[int]) -> list[Example]:
        return [reverse_example(split, i) for i in indices]

    def prompt_text(self, example, is_encoder_decoder: bool) -> str:
        return prompt_text(example.source, is_encoder_decoder)

    def sft_loss_on_reference_only(self) -> bool:
        return True  # not in the reference: EOS, and no loss on the task's random prompts


def make_task(name: str, options) -> ReverseTask:
    return ReverseTask(name, options)


def prompt_text(source: str, is_encoder_decoder: bool) -> str:
    return source if is_encoder_decoder else source + SEPARATOR
