"""The verifiable-reward math tasks: the final-answer parser on tricky strings,
the generators' determinism and answers, the 0/1 reward and its format component,
and their registration as text tasks."""

from __future__ import annotations

from fractions import Fraction

import pytest

from workloads.text import tasks
from workloads.text.math_tasks import MATH_TASKS, math_example, parse_final_answer
from workloads.text.rewards import get_reward

# (output, parsed answer, explicit form?)
TRICKY = [
    ("Answer: 42", 42, True),
    ("The answer is 42.", 42, True),
    ("answer:42", 42, True),
    ("Final answer = 42", 42, True),
    ("Answer: **42**", 42, True),
    ("Answer: $42", 42, True),
    ("#### 42", 42, True),
    ("\\boxed{42}", 42, True),
    ("\\boxed{42} but wait, 7", 42, True),  # boxed beats a later stray number
    ("Answer: 17 + 25 = 42", 42, True),  # an "=" chain after Answer: gives its result
    ("Answer: 5\nHope this helps with your 2 questions", 5, True),  # explicit beats the last number
    ("Answer: 3\nAnswer: 4", 4, True),  # the last explicit answer wins
    ("17 + 25 = 42", 42, False),  # no explicit form: the last number
    ("17 + 25 = 42. So we get 42 apples", 42, False),
    ("I think it is 40, no, 42", 42, False),
    ("answer is not 5, it is 7", 7, False),  # "answer is" not followed by a number is not explicit
    ("Answer: <number>", None, False),  # the instruction echoed, no number anywhere
    ("no number here", None, False),
    ("", None, False),
    ("x = -5", -5, False),
    ("10 - 5", 5, False),  # a binary minus is not a sign
    ("10-5", 5, False),
    ("Answer: −3", -3, True),  # unicode minus
    ("Answer: 1,234", 1234, True),  # thousands separator
    ("Answer: 42.0", 42, True),
    ("Answer: 3/4", Fraction(3, 4), True),
    ("1/0", None, False),
    ("He has 3rd place and 12 cards", 12, False),
]


@pytest.mark.parametrize("output, expected, explicit", TRICKY)
def test_parse_final_answer(output, expected, explicit):
    value, was_explicit = parse_final_answer(output)
    assert value == (None if expected is None else Fraction(expected))
    assert was_explicit is explicit


def test_examples_are_deterministic_and_answers_correct():
    for task in MATH_TASKS:
        a = tasks.task_named(task).examples("train", list(range(50)))
        assert a == tasks.task_named(task).examples("train", list(range(50)))
        assert a != tasks.task_named(task).examples("validation", list(range(50)))
        for ex in a:
            assert ex.target == f"Answer: {ex.answer}" and "Answer: <number>" in ex.source
    for ex in tasks.task_named("arithmetic_d3").examples("train", list(range(200))):
        expression = ex.source.removeprefix("What is ").split("?")[0]
        assert eval(expression) == ex.answer  # noqa: S307 -- our own generated "a + b - c"
    for ex in tasks.task_named("arithmetic_d5").examples("train", list(range(200))):
        assert eval(ex.source.removeprefix("What is ").split("?")[0]) == ex.answer  # noqa: S307
    with pytest.raises(IndexError):
        math_example("arithmetic_d1", "test", 2000)


def test_reward_is_exact_with_separate_format_component():
    plain, weighted = get_reward("math_answer"), get_reward("math_answer", format_weight=0.5)
    outputs = ["Answer: 10", "9 + 1 = 10", "Answer: 11", "ten"]
    refs = ["Answer: 10"] * 4
    got = plain([""] * 4, outputs, refs)
    assert [r.value for r in got] == [1.0, 1.0, 0.0, 0.0]
    assert [r.components for r in got] == [{"correct": 1.0, "format": 1.0}, {"correct": 1.0, "format": 0.0},
                                           {"correct": 0.0, "format": 1.0}, {"correct": 0.0, "format": 0.0}]
    assert [r.value for r in weighted([""] * 4, outputs, refs)] == [1.5, 1.0, 0.5, 0.0]


def test_registered_as_text_tasks():
    from workloads import validate_config

    assert tasks.task_named("arithmetic_d1").default_reward == "math_answer"
    assert tasks.task_named("word_problems_d2").split_size("validation") == 2000
    for workload in ("extract", "sft", "grpo"):
        config = validate_config(workload, {"task": "arithmetic_d2"})
        assert config.task == "arithmetic_d2"
    with pytest.raises(Exception, match="format_weight must be a number >= 0"):
        validate_config("extract", {"task": "arithmetic_d1", "reward": "math_answer",
                                    "reward_args": {"format_weight": -1}})
