"""What both importers (import_rl4lms.py, import_plan.py) share: the notes of values
they translate or drop, the table `rlgrad import` prints, the sweep file with each
note written as a YAML comment beside the field it concerns, and the provenance line.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import yaml

REFERENCE_REPO = "apple/ml-rlgrad"


@dataclass(frozen=True)
class Note:
    """One original field whose value is not copied unchanged.

    theirs: the original's dotted field; value: its value there;
    stage: the stage it lands in; ours: our dotted field under the stage's
    `config` (None: dropped, or a stage-level key such as `from_stage`);
    why: what changed and why (one line)."""

    theirs: str
    value: Any
    stage: str
    ours: str | None
    why: str


def original_path(path: str) -> str:
    """The file's path inside the reference repository (rl4lms_scripts/..., sft_vs_rft/...)
    when recognisable, else its base name."""
    normalized = path.replace(os.sep, "/")
    for marker in ("rl4lms_scripts/", "sft_vs_rft/"):
        if marker in normalized:
            return marker + normalized.split(marker, 1)[1]
    return os.path.basename(path)


def provenance(path: str) -> str:
    return f"imported from {REFERENCE_REPO} {original_path(path)}"


def notes_table(notes: list[Note]) -> str:
    """A plain-text table, one row per translated or dropped value."""
    if not notes:
        return "rlgrad import: every field copied unchanged\n"
    rows = [("original field", "value", "rlgrad", "why")]
    for n in notes:
        ours = f"{n.stage}: {n.ours}" if n.ours else f"{n.stage}: (dropped)"
        rows.append((n.theirs, _short(n.value), ours, n.why))
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    lines = ["  ".join(r[i].ljust(widths[i]) for i in range(3)) + "  " + r[3] for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths) + "  " + "-" * 3)
    return "rlgrad import: translated or dropped values\n" + "\n".join(lines) + "\n"


def _short(value: Any) -> str:
    text = yaml.safe_dump(value, default_flow_style=True, width=10_000).strip()
    text = text[:-4].strip() if text.endswith("\n...") or text.endswith(" ...") else text
    return text if len(text) <= 60 else text[:57] + "..."


def render(spec: dict, notes: list[Note], source: str) -> str:
    """The sweep file: a provenance header, then the spec as YAML where every note is a
    comment beside the field it maps to (dropped values beside the stage's `config:`)."""
    text = yaml.safe_dump(spec, sort_keys=False, width=120)
    by_line: dict[tuple[str, str], list[Note]] = {}
    for n in notes:
        by_line.setdefault((n.stage, n.ours or ""), []).append(n)
    out, stage, path = [], None, []  # path: (indent, key) of the enclosing mapping keys under `config:`
    for line in text.splitlines():
        stripped = line.lstrip(" -")
        indent = len(line) - len(stripped)
        if line.startswith("- name: ") or line.startswith("  - name: "):
            stage = line.split("name: ", 1)[1].strip()
            path = []
        key = stripped.split(":", 1)[0] if ":" in stripped and not stripped.startswith("#") else None
        comments: list[Note] = []
        if stage is not None and key is not None:
            while path and path[-1][0] >= indent:
                path.pop()
            if key == "config" and not path:
                comments = by_line.get((stage, ""), [])
                path = [(indent, "config")]
            elif path and path[0][1] == "config":
                path.append((indent, key))
                dotted = ".".join(k for _, k in path[1:])
                comments = by_line.get((stage, dotted), [])
            elif key in ("from_stage", "workload"):
                comments = by_line.get((stage, key), [])
        if comments and key == "config" and len(path) == 1:  # dropped values: one comment line each, below
            out.append(line)
            out.extend(f"{' ' * (indent + 2)}# {n.theirs}: {_short(n.value)} -> dropped: {n.why}" for n in comments)
            continue
        if comments:
            line += "  # " + "; ".join(f"{n.theirs}: {_short(n.value)} -> {n.why}" for n in comments)
        out.append(line)
    header = f"# {provenance(source)}\n# imported by `rlgrad import`; comments mark values translated or dropped\n"
    return header + "\n".join(out) + "\n"
