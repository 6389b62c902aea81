"""The fault suite's result table: one row per scenario, printed at the end of the session (the conftest's
`pytest_terminal_summary`) and written as JSON under the pytest tmp dir.

A row is recorded before the scenario asserts, so a failing scenario still shows what it saw.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class Row:
    """What one scenario saw. `alive` is None for kill scenarios (the process is meant to die)."""

    scenario: str
    mode: str = "reduced"
    inputs: int = 0
    scored: int = 0  # distinct inputs with a score record
    dead: int = 0  # distinct inputs with a dead letter
    lost: int = 0  # inputs with neither
    duplicates: int = 0  # output records beyond the first per input
    dup_identical: bool | None = None  # every repeat carries the same id and score (None: no duplicates)
    redis_exact: bool | None = None  # window totals == distinct inputs (images == scored, dead == dead)
    alive: bool | None = None
    seconds: float = 0.0
    status: str = "?"  # passed / FAILED / xfail, filled in by the conftest after the test
    notes: str = ""
    extra: dict[str, Any] = field(default_factory=dict)
    nodeid: str = ""


ROWS: list[Row] = []
FUZZ_LINES: list[str] = []
STATE: dict[str, Any] = {"json_path": None}

_COLUMNS = [
    ("scenario", 20),
    ("mode", 7),
    ("inputs", 6),
    ("scored", 6),
    ("dead", 5),
    ("lost", 4),
    ("dups", 5),
    ("dup_same", 8),
    ("redis_exact", 11),
    ("alive", 5),
    ("secs", 6),
    ("status", 7),
]


def record(row: Row) -> Row:
    """Add a row (replacing an earlier one of the same test, e.g. on a rerun)."""
    ROWS[:] = [r for r in ROWS if not (r.nodeid and r.nodeid == row.nodeid)]
    ROWS.append(row)
    return row


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "NO"
    if isinstance(value, float):
        return f"{value:.1f}"
    return str(value)


def format_table(rows: list[Row]) -> list[str]:
    """The table as lines of text, then one line of notes per row that has some."""
    head = " ".join(name.ljust(width) for name, width in _COLUMNS)
    lines = [head, "-" * len(head)]
    for r in rows:
        values = [
            r.scenario, r.mode, r.inputs, r.scored, r.dead, r.lost, r.duplicates, r.dup_identical,
            r.redis_exact, r.alive, r.seconds, r.status,
        ]
        lines.append(" ".join(_cell(v).ljust(width) for v, (_, width) in zip(values, _COLUMNS, strict=True)))
    for r in rows:
        if r.notes:
            lines.append(f"  {r.scenario}: {r.notes}")
    for r in rows:
        per_kind = r.extra.get("per_kind")
        if per_kind:
            lines.append(f"  {r.scenario} per kind (outcome: score, or dlq:<reason>):")
            lines.extend(f"    {kind:<30} {outcome}" for kind, outcome in per_kind.items())
    return lines


def write_json(path: Path, rows: list[Row]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"rows": [asdict(r) for r in rows], "fuzz": FUZZ_LINES}, indent=2, default=str))
    return path
