"""Hand-written hard cases for math-answer graders (benchmarks/math_answer_parsers.py).

Each case is ``(completion_text, target, expected_correct, note)``:

* ``completion_text`` -- what a model might write;
* ``target`` -- the gold answer as our tasks store it: ``"Answer: N"`` for the
  integer tasks, and a few plain ``"3/4"``, ``"-7"``, ``"0.5"``;
* ``expected_correct`` -- the verdict of a careful human grader who reads the
  whole completion and asks "did the model commit to the right final answer?";
* ``note`` -- a short tag, then why the case is hard.

Judgement calls (marked "judgement" in the note) are cases where graders could
reasonably differ; the verdict given is the one we want the reward to give.
Not collected by pytest (no ``test_`` prefix); it is data.
"""

from __future__ import annotations

CASES: list[tuple[str, str, bool, str]] = [
    # ---- \boxed{} -------------------------------------------------------------
    ("We add: 17 + 25 = 42, so the result is \\boxed{42}.",
     "Answer: 42", True, "boxed int"),
    ("The probability is \\boxed{\\frac{3}{4}}.",
     "3/4", True, "boxed nested braces \\frac{3}{4}"),
    ("Flipping it gives \\boxed{\\frac{4}{3}}.",
     "3/4", False, "boxed reciprocal 4/3, wrong"),
    ("Tom ends with \\boxed{42 \\text{ apples}}.",
     "Answer: 42", True, "boxed with \\text{} unit inside"),
    ("10 - 17 = -7, hence \\boxed{-7}.",
     "-7", True, "boxed negative"),
    ("First try: \\boxed{40}. That misses the 2 extra apples, so the total is \\boxed{42}.",
     "Answer: 42", True, "two boxed, last one is final"),
    ("\\boxed{41}\nWait, I forgot one apple. Answer: 42",
     "Answer: 42", True, "boxed wrong then corrected in Answer: line (judgement)"),
    # ---- LaTeX fractions / inline math ---------------------------------------
    ("So the answer is $\\dfrac{3}{4}$.",
     "3/4", True, "inline \\dfrac after 'answer is'"),
    ("Half of the cake: $\\frac{1}{2}$ of it is left.",
     "0.5", True, "\\frac{1}{2} vs decimal gold 0.5"),
    ("Answer: $-\\frac{1}{2}$",
     "-0.5", True, "negative LaTeX fraction vs -0.5"),
    ("So Tom has $42$ apples.",
     "Answer: 42", True, "inline $42$, no answer tag"),
    ("Therefore the total is \\(42\\).",
     "Answer: 42", True, "\\( 42 \\) inline math"),
    # ---- explicit answer phrases ----------------------------------------------
    ("Answer: 42",
     "Answer: 42", True, "plain Answer: N"),
    ("Tom had 40 and got 2 more. The answer is 42.",
     "Answer: 42", True, "'The answer is N.'"),
    ("**Answer:** 42",
     "Answer: 42", True, "markdown bold Answer:"),
    ("40 + 2 = 42\n#### 42",
     "Answer: 42", True, "GSM8K #### N"),
    ("Answer: 17 + 25 = 42",
     "Answer: 42", True, "Answer: line holding an equation"),
    ("Answer: 42 apples, because Tom had 40 and got 2 more.",
     "Answer: 42", True, "trailing explanation with other numbers after Answer: N"),
    ("The answer is 42. Check: 40 + 2 = 42, and 42 - 2 = 40.",
     "Answer: 42", True, "answer line continues with a check whose last = gives 40"),
    ("Answer: 42\n\nNow another one: 5 + 3 = 8.",
     "Answer: 42", True, "answer then rambling on a new problem"),
    # ---- no tag: last number / equations --------------------------------------
    ("Tom has 40 apples and gets 2 more, so he has 42",
     "Answer: 42", True, "last number is the answer, no tag"),
    ("17 + 25 = 42",
     "Answer: 42", True, "bare equation"),
    ("x = 5",
     "Answer: 5", True, "x = 5"),
    ("17 + 25 = 42. Next question: what is 3 + 4?",
     "Answer: 42", True, "solved, then rambles a new question; last number 4 (judgement)"),
    ("Is it 40, 41 or 42? I'm not sure.",
     "Answer: 42", False, "hedging between candidates, no commitment"),
    # ---- units / formatting of numbers ---------------------------------------
    ("It costs $42.",
     "Answer: 42", True, "dollar sign as currency, unbalanced $"),
    ("The total is \\$42.",
     "Answer: 42", True, "escaped \\$ currency"),
    ("The rope is 42 cm long.",
     "Answer: 42", True, "unit cm"),
    ("The total is 1,234.",
     "Answer: 1234", True, "thousands separator 1,234"),
    ("Answer: 12,345 coins",
     "Answer: 12345", True, "thousands separator after Answer: with unit"),
    ("Answer: 42.0",
     "Answer: 42", True, "decimal equal to integer"),
    ("Answer: 0.50",
     "0.5", True, "trailing zero decimal"),
    ("Answer: .5",
     "0.5", True, "decimal without leading zero"),
    ("Answer: 1/2",
     "0.5", True, "fraction vs decimal gold"),
    ("Answer: 84/2",
     "Answer: 42", True, "unsimplified fraction equal to gold (judgement)"),
    ("So 0.75 of the pizza was eaten.",
     "3/4", True, "decimal vs fraction gold"),
    ("The discount is 25%.",
     "Answer: 25", True, "percent sign, gold is the percent number"),
    ("Answer: 50%",
     "0.5", True, "50% equals 0.5 (judgement)"),
    ("Answer: 4 2",
     "Answer: 42", False, "garbled digits '4 2' are not 42"),
    # ---- signs ----------------------------------------------------------------
    ("Answer: −7",
     "-7", True, "unicode minus U+2212"),
    ("10 - 17 = -7",
     "-7", True, "negative result of a subtraction"),
    ("The result is negative 7.",
     "-7", True, "sign in words"),
    ("The answer is 7.",
     "-7", False, "sign dropped"),
    # ---- wrong answers that contain the right number --------------------------
    ("17 + 25 = 42.\nAnswer: 43",
     "Answer: 42", False, "right work, wrong final Answer: line"),
    ("40 + 2 = 42 is what I first thought, but the answer is 38.",
     "Answer: 42", False, "right number early, wrong final answer"),
    ("The answer is not 42.",
     "Answer: 42", False, "negated: 'answer is not 42'"),
    ("Answer: 420",
     "Answer: 42", False, "gold is a prefix of the answer"),
    ("The answer is approximately 42.3",
     "Answer: 42", False, "close but not equal decimal"),
    ("The answer is forty-two.",
     "Answer: 42", True, "number in words"),
    # ---- nothing to grade -----------------------------------------------------
    ("",
     "Answer: 42", False, "empty output"),
    ("Let me think about how many apples Tom has.",
     "Answer: 42", False, "reasoning only, no number"),
]
