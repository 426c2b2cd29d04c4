"""Verifiable-reward tasks: arithmetic and word problems with a difficulty knob.

Task names carry the difficulty: ``arithmetic_d1`` .. ``arithmetic_d5`` and
``word_problems_d1`` .. ``word_problems_d3``. Input i of a split is a pure function
of (task, split, i) -- a SHA-256 of them seeds its generator -- so every worker,
retry and later stage sees the same problem without a dataset file; the answer
is an integer computed by the generator, so the reward is exact.

    arithmetic_d1   a + b                      a, b in 1..9
    arithmetic_d2   a + b, a - b               a, b in 10..99
    arithmetic_d3   a ± b ± c                  a, b, c in 10..99
    arithmetic_d4   a × b, a × b ± c           a in 2..12, b in 2..19, c in 1..99
    arithmetic_d5   a ± b × c ± d              3-digit a, d; b, c in 2..25
    word_problems_d1  one step  (has n, gets m more / gives m away)
    word_problems_d2  two steps (gets m, then gives k away)
    word_problems_d3  groups    (n boxes of m, plus/minus k)

Why our own generators rather than reasoning-gym: they are ~100 lines, pure
Python, need nothing installed (reasoning-gym brings a dozen dependencies and
its datasets are seeded per dataset, not per input index, while our tables key
everything on `input_id`), and the difficulty levels are tuned to where a 135M
model sits: at d1 SmolLM2-135M-Instruct solves some prompts always, some never,
some sometimes -- the spread of reward std that the vanishing-gradient study
needs.

The reward `math_answer` (workloads/text/rewards.py) is 1 when the FINAL answer
parsed from the output (`parse_final_answer`) equals the target, else 0; the
format component (the answer given as "Answer: N" or \\boxed{N}) is reported
separately and added to the reward only with `format_weight` > 0.
"""

from __future__ import annotations

import hashlib
import random
import re
from dataclasses import dataclass
from fractions import Fraction

from .task_base import Task

SPLIT_SIZES = {"train": 50_000, "validation": 2_000, "test": 2_000}
INSTRUCTION = "Give the final answer as 'Answer: <number>'."
PEOPLE = ["Tom", "Ana", "Li", "Sam", "Maya", "Omar", "Eva", "Ben", "Zoe", "Raj"]
ITEMS = ["apples", "books", "coins", "marbles", "pencils", "stickers", "cards", "shells"]


def _levels(prefix: str, count: int) -> tuple[str, ...]:
    return tuple(f"{prefix}_d{d}" for d in range(1, count + 1))


MATH_TASKS = (*_levels("arithmetic", 5), *_levels("word_problems", 3))
NAMES = MATH_TASKS  # registered in workloads/text/tasks.py


@dataclass(frozen=True)
class Example:
    input_id: int
    source: str  # the question, with the answer-format instruction
    target: str  # the integer answer as text (SFT target: "Answer: N" is built from it)
    answer: int


def task_family_and_level(task: str) -> tuple[str, int]:
    if task not in MATH_TASKS:
        raise ValueError(f"unknown task {task!r}; math tasks: {list(MATH_TASKS)}")
    family, level = task.rsplit("_d", 1)
    return family, int(level)


def _rng(task: str, split: str, index: int) -> random.Random:
    digest = hashlib.sha256(f"{task}/{split}/{index}".encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "little"))


def _signed_terms(rng: random.Random, terms: list[int]) -> tuple[str, int]:
    text, value = str(terms[0]), terms[0]
    for term in terms[1:]:
        if rng.random() < 0.5:
            text, value = f"{text} + {term}", value + term
        else:
            text, value = f"{text} - {term}", value - term
    return text, value


def arithmetic(level: int, rng: random.Random) -> tuple[str, int]:
    if level == 1:
        a, b = rng.randint(1, 9), rng.randint(1, 9)
        return f"{a} + {b}", a + b
    if level == 2:
        return _signed_terms(rng, [rng.randint(10, 99), rng.randint(10, 99)])
    if level == 3:
        return _signed_terms(rng, [rng.randint(10, 99) for _ in range(3)])
    if level == 4:
        a, b = rng.randint(2, 12), rng.randint(2, 19)
        if rng.random() < 0.5:
            return f"{a} * {b}", a * b
        text, value = _signed_terms(rng, [a * b, rng.randint(1, 99)])
        return f"{a} * {b}" + text[len(str(a * b)):], value
    b, c = rng.randint(2, 25), rng.randint(2, 25)
    a, d = rng.randint(100, 999), rng.randint(100, 999)
    sign1, sign2 = rng.choice("+-"), rng.choice("+-")
    value = a + (b * c if sign1 == "+" else -b * c)
    value = value + (d if sign2 == "+" else -d)
    return f"{a} {sign1} {b} * {c} {sign2} {d}", value


def word_problem(level: int, rng: random.Random) -> tuple[str, int]:
    name, item = rng.choice(PEOPLE), rng.choice(ITEMS)
    if level == 1:
        n, m = rng.randint(2, 20), rng.randint(1, 9)
        if rng.random() < 0.5:
            return f"{name} has {n} {item} and gets {m} more. How many {item} does {name} have now?", n + m
        n = n + m
        return f"{name} has {n} {item} and gives {m} away. How many {item} does {name} have now?", n - m
    if level == 2:
        n, m, k = rng.randint(5, 30), rng.randint(2, 15), rng.randint(1, 5)
        return (f"{name} has {n} {item}, buys {m} more, then gives {k} to a friend. "
                f"How many {item} does {name} have now?", n + m - k)
    n, m, k = rng.randint(2, 9), rng.randint(2, 12), rng.randint(1, 9)
    if rng.random() < 0.5:
        return (f"{name} has {n} boxes with {m} {item} in each, and {k} loose {item}. "
                f"How many {item} does {name} have in all?", n * m + k)
    return (f"{name} has {n} boxes with {m} {item} in each and loses {k} of them. "
            f"How many {item} are left?", n * m - k)


def math_example(task: str, split: str, index: int) -> Example:
    family, level = task_family_and_level(task)
    if split not in SPLIT_SIZES:
        raise ValueError(f"unknown split {split!r}; allowed: {sorted(SPLIT_SIZES)}")
    if not 0 <= index < SPLIT_SIZES[split]:
        raise IndexError(f"input {index} out of range for split {split!r} of size {SPLIT_SIZES[split]}")
    rng = _rng(task, split, index)
    if family == "arithmetic":
        expression, answer = arithmetic(level, rng)
        question = f"What is {expression}?"
    else:
        question, answer = word_problem(level, rng)
    return Example(index, f"{question} {INSTRUCTION}", f"Answer: {answer}", answer)


class MathTask(Task):
    default_reward = "math_answer"

    def __init__(self, name: str, options):
        task_family_and_level(name)
        super().__init__(name, options)

    def split_size(self, split: str) -> int:
        if split not in SPLIT_SIZES:
            raise ValueError(f"unknown split {split!r}; allowed: {sorted(SPLIT_SIZES)}")
        return SPLIT_SIZES[split]

    def examples(self, split: str, indices: list[int]) -> list[Example]:
        return [math_example(self.name, split, i) for i in indices]


def make_task(name: str, options) -> MathTask:
    return MathTask(name, options)


# --------------------------------------------------------------------------
# the final-answer parser
# --------------------------------------------------------------------------

_NUMBER = r"(?:(?<![\w)])[-−])?(?:\d[\d,]*(?:\.\d+)?|(?<![\w.])\.\d+)(?:\s*/\s*\d+(?:\.\d+)?)?"
_ANY_NUMBER = re.compile(_NUMBER)
_FRAC_ARG = r"(?:\{\s*([-−]?(?:\d[\d,]*(?:\.\d+)?|\.\d+))\s*\}|(\d))"  # {-12.5} or one digit (\frac12)
_LATEX_FRAC = re.compile(r"\\[cdt]?frac\s*" + _FRAC_ARG + r"\s*" + _FRAC_ARG)
_BOXED = re.compile(r"\\(?:boxed|fbox)\s*\{")
_BRACE_TOKEN = re.compile(r"\\.|[{}]", re.DOTALL)
# "Answer: ...", "the answer is ...", "final answer = ...", "#### ..."; what follows, up to the
# end of its clause, is the answer ("answer isn't" leaves "n't" there, for _NEGATED)
_ANSWER_LINE = re.compile(r"(?:(?:final\s+)?answer\s*(?:is(?=n['’]t\b)|is\b|:|=)|####)", re.IGNORECASE)
_NEGATED = re.compile(r"[ \t*:$]*(?:not|n['’]t|never)\b", re.IGNORECASE)
# where a clause ends: a line end, ". " / "!" / "?" / ";" (not the point of "3.5"), or ", "
_CLAUSE_END = re.compile(r"\n|[.!?;](?=\s|$)|,\s")


def _latex_fraction(match: re.Match) -> str:
    numerator, denominator = match.group(1) or match.group(2), match.group(3) or match.group(4)
    sign = "-" if (numerator[0] in "-−") != (denominator[0] in "-−") else ""
    glue = " " if match.start() and match.string[match.start() - 1].isdigit() else ""  # 2\frac12 is not 21/2
    return f"{glue}{sign}{numerator.lstrip('-−')}/{denominator.lstrip('-−')}"


def _boxed(text: str) -> list[tuple[int, str]]:
    """(start, content) of each \\boxed{...} (or \\fbox), nested braces balanced, "\\{" skipped; linear."""
    openers = {match.end() - 1: match.start() for match in _BOXED.finditer(text)}
    found, stack = [], []
    for token in _BRACE_TOKEN.finditer(text):
        if token.group() == "{":
            stack.append(token.start())
        elif token.group() == "}" and stack:
            brace = stack.pop()
            if brace in openers:
                found.append((openers[brace], text[brace + 1:token.start()]))
    return sorted(found)


def _to_number(text: str) -> Fraction | None:
    text = text.replace("−", "-").replace(" ", "").replace(",", "")
    try:
        if "/" in text:
            numerator, denominator = text.split("/")
            return Fraction(numerator) / Fraction(denominator) if Fraction(denominator) else None
        return Fraction(text)
    except (ValueError, ZeroDivisionError):
        return None


def _number_in(segment: str) -> Fraction | None:
    """The answer inside an explicit segment: after an "=" chain its result (the
    number after the last "="), otherwise the number it starts with (markdown
    bold, "$" and spaces skipped): "answer is about 5" is not explicit."""
    if "=" in segment:
        segment = segment.rsplit("=", 1)[1]
    segment = segment.lstrip(" \t*$:")
    if not _ANY_NUMBER.match(segment):
        return None
    for candidate in _ANY_NUMBER.findall(segment):
        value = _to_number(candidate)
        if value is not None:
            return value
    return None


def parse_final_answer(output: str) -> tuple[Fraction | None, bool]:
    """(the final answer as an exact number or None, whether it was in an explicit form).

    Explicit forms, the LAST one in the output winning: \\boxed{N} (nested braces
    allowed); "Answer: N" / "the answer is N" / "final answer = N" / "#### N",
    read up to the end of that clause (". ", ", ", ";"), so "Answer: 17 + 25 = 42"
    gives 42 and "The answer is 42. Check: 42 - 2 = 40" gives 42. A negated one
    ("the answer is not 5, ...") is no answer, and its clause's numbers are
    dropped. Otherwise the LAST number in the output. Read exactly: LaTeX
    \\frac{a}{b} / \\dfrac / \\tfrac (signed), "a/b", ".5", "42.0", "1,234", a
    unicode minus; "10 - 5" holds no negative number, "= -5" does."""
    text = _LATEX_FRAC.sub(_latex_fraction, output)
    explicit = [(start, _number_in(content)) for start, content in _boxed(text)]
    negated_clauses, position = [], 0
    while (match := _ANSWER_LINE.search(text, position)) is not None:
        negated = _NEGATED.match(text, match.end())
        clause_end = _CLAUSE_END.search(text, negated.end() if negated else match.end())
        position = clause_end.start() if clause_end else len(text)
        if negated:
            negated_clauses.append((match.end(), position))
        else:
            explicit.append((match.start(), _number_in(text[match.end():position])))
    answers = [(start, value) for start, value in explicit if value is not None]
    if answers:
        return max(answers, key=lambda answer: answer[0])[1], True
    kept, previous = [], 0
    for start, end in negated_clauses:  # the fallback reads the text minus the negated clauses
        kept.append(text[previous:start])
        previous = end
    kept.append(text[previous:])
    for candidate in reversed(_ANY_NUMBER.findall(" ".join(kept))):
        value = _to_number(candidate)
        if value is not None:
            return value, False
    return None, False


def answer_reward(output: str, target: str) -> tuple[float, float]:
    """(correct in {0, 1}, format in {0, 1}) of an output against a target "Answer: N" or "N"."""
    expected, _ = parse_final_answer(target)
    value, explicit = parse_final_answer(output)
    return float(value is not None and value == expected), float(explicit)
