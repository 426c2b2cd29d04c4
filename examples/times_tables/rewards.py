"""Reward functions with TRL's signature: f(prompts, completions, **columns) -> list[float | None]."""

import re


def correct(prompts, completions, answer, **kwargs):
    """1 when the completion's first line holds the answer as a number, else 0."""
    firsts = [re.findall(r"-?\d+", (c.strip().splitlines() or [""])[0]) for c in completions]
    return [float(a in numbers) for numbers, a in zip(firsts, answer)]


def brief(prompts, completions, **kwargs):
    """1 for an answer of at most 12 words; None (not scored) for an empty completion."""
    return [None if not c.strip() else float(len(c.split()) <= 12) for c in completions]
