"""Reward functions with TRL's signature: f(prompts, completions, **columns) -> list[float | None]."""

import re


def correct(prompts, completions, answer, **kwargs):
    """1 when the first number in the completion is the answer, else 0."""
    firsts = [re.search(r"-?\d+", c) for c in completions]
    return [float(m is not None and m.group() == a) for m, a in zip(firsts, answer)]


def brief(prompts, completions, **kwargs):
    """1 for an answer of at most 12 words; None (not scored) for an empty completion."""
    return [None if not c.strip() else float(len(c.split()) <= 12) for c in completions]
