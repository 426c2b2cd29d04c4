"""Reward `math_verify`: 0/1 correctness graded by Hugging Face's math-verify.

An alternative to `math_answer` (workloads/text/math_tasks.py) for references
that are LaTeX or symbolic (fractions, expressions, sets): the output is
parsed with math-verify's default extraction (LaTeX, then plain expressions)
and verified against each reference; the reward is 1.0 when it verifies
against ANY of them, else 0.0, stored as the component "correct".

References: "Answer: 42" (our math tasks) is graded as gold "$42$"; any other
reference is parsed as it is, wrapped in "$...$" unless it already holds math
delimiters ("$", "\\(", "\\[") or a \\boxed{}.

math-verify is optional: it is imported only when the reward is built.
"""

from __future__ import annotations

import re

from .task_base import Reward

MATH_VERIFY_INSTALL = "pip install math-verify==0.9.0"

_ANSWER_PREFIX = re.compile(r"\s*answer\s*:\s*", re.IGNORECASE)
_MATH_DELIMITED = re.compile(r"\$|\\\(|\\\[|\\boxed\b")


def gold_text(reference: str) -> str:
    """The text math-verify parses as gold: "Answer: 42" -> "$42$", "3/4" -> "$3/4$", "$x^2$" unchanged."""
    text = reference.strip()
    prefix = _ANSWER_PREFIX.match(text)
    if prefix:
        text = text[prefix.end():].strip()
    return text if _MATH_DELIMITED.search(text) else f"${text}$"


def build_math_verify():
    """fn(prompts, outputs, references) -> [Reward(1.0 or 0.0, {"correct": same})]; references
    per output are one string or a list of them (any verified one gives 1.0)."""
    try:
        from math_verify import parse, verify
    except ImportError as error:
        raise ImportError(f"reward 'math_verify' needs math-verify: {MATH_VERIFY_INSTALL}") from error

    # Timeouts off, for thread safety: in math_verify 0.9.0, `parse` (math_verify/parser.py,
    # parsing_timeout=5 by default) and `verify` (math_verify/grader.py, timeout_seconds=5)
    # run their work under `timeout` (math_verify/utils.py), which uses signal.alarm and so
    # raises ValueError ("signal only works in main thread") off the main thread -- and Ray
    # workers call rewards from other threads. Given None, `timeout` returns the function
    # undecorated (no signals); the price is no time limit on a pathological output.
    def math_verify(prompts: list[str], outputs: list[str], references: list) -> list[Reward]:
        rewards = []
        for output, targets in zip(outputs, references, strict=True):
            targets = [targets] if isinstance(targets, str) else list(targets)
            answer = parse(output, parsing_timeout=None)
            value = float(bool(answer) and any(verify(parse(gold_text(target), parsing_timeout=None), answer,
                                                      timeout_seconds=None) for target in targets))
            rewards.append(Reward(value, {"correct": value}))
        return rewards

    return math_verify
