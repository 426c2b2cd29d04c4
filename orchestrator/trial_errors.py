"""A failed trial's cause in one line, for the trials table, the console and the report.

Tune hands the driver a failed trial's exception as Ray formats it: the first
line names Ray's actor (``ray::ImplicitFunc.train() (pid=…, ip=…)``, in ANSI
colours), then the remote traceback, and the exception that stopped the
workload comes last (``ValueError: …``), also when Ray Train wraps a worker's
error in a WorkerGroupError. The cause a user needs is that last exception line.
"""

from __future__ import annotations

import re

ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
# "ValueError: ...", "ray.train.WorkerGroupError: ...", "KeyboardInterrupt" at column 0
EXCEPTION_LINE = re.compile(r"^(?:[A-Za-z_][\w]*\.)*[A-Za-z_]\w*(?:Error|Exception|Interrupt|Exit|Failure|Warning)\b(?::.*)?$")
MAX_CHARS = 500


def strip_ansi(text: str) -> str:
    return ANSI.sub("", text)


def error_cause(error: BaseException | str) -> str:
    """The last exception line of `error`'s text (ANSI colours removed), at most
    MAX_CHARS; the last non-empty line when no line looks like an exception."""
    lines = [line.rstrip() for line in strip_ansi(str(error)).splitlines() if line.strip()]
    if not lines:
        return type(error).__name__ if isinstance(error, BaseException) else ""
    exception_lines = [line for line in lines if EXCEPTION_LINE.match(line)]
    return (exception_lines[-1] if exception_lines else lines[-1])[:MAX_CHARS]
