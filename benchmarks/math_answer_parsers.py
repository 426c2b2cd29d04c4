"""Math-answer graders on hand-written hard cases: our parser vs Hugging Face's math-verify.

    python benchmarks/math_answer_parsers.py              # table, totals, errors, timing
    python benchmarks/math_answer_parsers.py --repeats 50

Graders, each giving True (reward 1) or False:

* ours        -- ``answer_reward(output, target)[0] == 1.0`` (workloads/text/math_tasks.py);
* math-verify -- ``verify(parse(gold), parse(output))`` with math-verify's default
  extraction configs (LatexExtractionConfig + ExprExtractionConfig).

Gold for math-verify: our targets are "Answer: 42" (integer tasks) or a plain
"3/4" / "-7" / "0.5". We drop an "Answer:" prefix and wrap the rest in inline
math, ``parse("$42$")`` / ``parse("$3/4$")``, which math-verify reads as an exact
sympy Integer / Rational / Float. (``parse("Answer: 42")`` would work too, but
wrapping in $...$ leaves nothing to the prose extractor.)

Both math-verify calls run with ``parsing_timeout=None`` / ``timeout_seconds=None``:
its default 5 s timeouts use ``signal.alarm`` and raise ValueError when called
outside the main thread (e.g. in a reward thread pool), so None is how it would
run inside our workers. The default (signal) mode is timed too, for comparison.

Timing: each grader is called on every case, the whole list ``--repeats`` times;
the table prints the median seconds per call of each case, and the summary the
median over all cases. math-verify's lru caches (maxsize 20) are cleared before
each call, so its times are those of an output it has not seen before (what a
reward sees); the gold "$42$" is re-parsed each call, as a reward would.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import logging
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from tests.math_answer_cases import CASES  # noqa: E402
from workloads.text.math_tasks import answer_reward  # noqa: E402

from math_verify import parse, verify  # noqa: E402
from math_verify import parser as mv_parser  # noqa: E402

logging.getLogger("math_verify").setLevel(logging.ERROR)  # the "timeout disabled" warning


def gold_for_math_verify(target: str) -> str:
    """ "Answer: 42" -> "$42$", "3/4" -> "$3/4$"."""
    text = target.strip()
    if text.lower().startswith("answer:"):
        text = text[len("answer:"):].strip()
    return f"${text}$"


def ours(output: str, target: str) -> bool:
    return answer_reward(output, target)[0] == 1.0


def math_verify_grade(output: str, target: str, timeouts: bool = False) -> bool:
    kw_parse = {} if timeouts else {"parsing_timeout": None}
    kw_verify = {} if timeouts else {"timeout_seconds": None}
    gold = parse(gold_for_math_verify(target), **kw_parse)
    pred = parse(output, **kw_parse)
    return bool(verify(gold, pred, **kw_verify))


def math_verify_signal(output: str, target: str) -> bool:
    return math_verify_grade(output, target, timeouts=True)


def _clear_mv_caches() -> None:
    mv_parser.parse_latex_cached.cache_clear()
    mv_parser.parse_expr_cached.cache_clear()
    mv_parser.extract_latex.cache_clear()


def time_per_case(grader, repeats: int, clear=None) -> list[float]:
    """Median seconds per call of `grader` on each case over `repeats` passes over all cases."""
    samples: list[list[float]] = [[] for _ in CASES]
    for _ in range(repeats):
        for i, (output, target, _, _) in enumerate(CASES):
            if clear:
                clear()
            start = time.perf_counter()
            grader(output, target)
            samples[i].append(time.perf_counter() - start)
    return [statistics.median(s) for s in samples]


def _short(text: str, width: int) -> str:
    text = text.replace("\n", "⏎")
    return text if len(text) <= width else text[: width - 1] + "…"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=20)
    args = ap.parse_args()

    verdicts_ours = [ours(o, t) for o, t, _, _ in CASES]
    verdicts_mv = [math_verify_grade(o, t) for o, t, _, _ in CASES]
    verdicts_mv_sig = [math_verify_signal(o, t) for o, t, _, _ in CASES]
    if verdicts_mv != verdicts_mv_sig:  # the timeouts must not change a verdict here
        print("NOTE: math-verify verdicts differ with signal timeouts on:",
              [f"c{i + 1:02d}" for i, (a, b) in enumerate(zip(verdicts_mv, verdicts_mv_sig)) if a != b])

    time_ours = time_per_case(ours, args.repeats)
    time_mv = time_per_case(math_verify_grade, args.repeats, clear=_clear_mv_caches)
    time_mv_sig = time_per_case(math_verify_signal, args.repeats, clear=_clear_mv_caches)

    def mark(verdict: bool, expected: bool) -> str:
        return ("1" if verdict else "0") + ("  " if verdict == expected else " X")

    print(f"math-verify {importlib.metadata.version('math-verify')}, {len(CASES)} cases, "
          f"{args.repeats} timing repeats; columns: verdict (1 = reward 1), X = wrong verdict\n")
    header = (f"{'id':4} {'exp':3} {'ours':4} {'m-v':4} {'ours_us':>8} {'mv_us':>8}  "
              f"{'target':13} {'completion':42} note")
    print(header)
    print("-" * len(header))
    for i, (output, target, expected, note) in enumerate(CASES):
        print(f"c{i + 1:02d} {int(expected):>3} {mark(verdicts_ours[i], expected):4} "
              f"{mark(verdicts_mv[i], expected):4} {time_ours[i] * 1e6:8.1f} {time_mv[i] * 1e6:8.1f}  "
              f"{_short(target, 13):13} {_short(output, 42):42} {note}")

    n = len(CASES)
    right_ours = sum(v == c[2] for v, c in zip(verdicts_ours, CASES))
    right_mv = sum(v == c[2] for v, c in zip(verdicts_mv, CASES))
    print(f"\ncorrect verdicts: ours {right_ours}/{n}, math-verify {right_mv}/{n}")
    ints = [i for i, c in enumerate(CASES) if c[1].startswith("Answer:")]  # what our tasks store
    print(f"  of which 'Answer: N' integer targets ({len(ints)}): "
          f"ours {sum(verdicts_ours[i] == CASES[i][2] for i in ints)}, "
          f"math-verify {sum(verdicts_mv[i] == CASES[i][2] for i in ints)}")
    for name, verdicts in (("ours", verdicts_ours), ("math-verify", verdicts_mv)):
        wrong = [i for i, v in enumerate(verdicts) if v != CASES[i][2]]
        false_pos = sum(1 for i in wrong if verdicts[i])
        print(f"\n{name} wrong on {len(wrong)} ({false_pos} false reward 1, {len(wrong) - false_pos} false reward 0):")
        for i in wrong:
            print(f"  c{i + 1:02d} said {int(verdicts[i])}: {CASES[i][3]}  | {_short(CASES[i][0], 60)}")

    print("\ntime per call (median over cases of each case's median over repeats):")
    print(f"  ours                                {statistics.median(time_ours) * 1e6:9.1f} us"
          f"   (max case {max(time_ours) * 1e6:.1f} us)")
    print(f"  math-verify, timeouts=None          {statistics.median(time_mv) * 1e6:9.1f} us"
          f"   (max case {max(time_mv) * 1e6:.1f} us)")
    print(f"  math-verify, default signal timeouts {statistics.median(time_mv_sig) * 1e6:8.1f} us"
          f"   (max case {max(time_mv_sig) * 1e6:.1f} us)")


if __name__ == "__main__":
    main()
