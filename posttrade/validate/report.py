"""The gate's result: one `Check` per criterion, printed as a table and written as JSON.

A check is PASS or FAIL, with the figure that was measured beside the criterion it
was held against (`measured`, plus `value`/`limit` for the numeric ones) and the
evidence in `details` (the differences found, the log lines, the samples).
"""

from __future__ import annotations

import json
import shutil
import textwrap
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

PASS, FAIL = "PASS", "FAIL"

#: The four tests of the SPEC's validation gate.
SECTIONS = {1: "P&L accuracy", 2: "Data flow", 3: "Performance", 4: "Integration"}


@dataclass
class Check:
    section: int  # 1..4, see SECTIONS
    name: str  # stable id, e.g. "accuracy.ptrc_positions"
    criterion: str  # what must hold, in words
    passed: bool
    measured: str  # the figure, in words ("p99 23.4 ms over 200 fills")
    value: float | int | None = None  # the measured number, when there is one
    limit: float | int | None = None  # the floor or ceiling it was held against
    unit: str | None = None
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def status(self) -> str:
        return PASS if self.passed else FAIL

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["status"] = self.status
        data["test"] = SECTIONS[self.section]
        return data


def failed(section: int, name: str, criterion: str, reason: str, **details: Any) -> Check:
    """A check that could not be carried out (service unreachable, timed out...)."""
    return Check(section, name, criterion, False, reason, details=details)


@dataclass
class GateReport:
    run_id: str
    started_at: datetime
    urls: dict[str, str]
    checks: list[Check] = field(default_factory=list)
    finished_at: datetime | None = None
    notes: list[str] = field(default_factory=list)  # what was not run, and why
    timings: dict[str, float] = field(default_factory=dict)  # seconds per part of the run

    @property
    def passed(self) -> bool:
        return bool(self.checks) and all(c.passed for c in self.checks)

    @property
    def seconds(self) -> float | None:
        if self.finished_at is None:
            return None
        return round((self.finished_at - self.started_at).total_seconds(), 3)

    def add(self, *checks: Check) -> None:
        self.checks.extend(checks)

    def finish(self) -> None:
        self.finished_at = datetime.now(timezone.utc)

    def to_json(self) -> dict[str, Any]:
        return {
            "run_id": self.run_id,
            "status": PASS if self.passed else FAIL,
            "started_at": self.started_at.isoformat(),
            "finished_at": self.finished_at.isoformat() if self.finished_at else None,
            "seconds": self.seconds,
            "urls": self.urls,
            "passed": sum(c.passed for c in self.checks),
            "failed": sum(not c.passed for c in self.checks),
            "checks": [c.to_json() for c in self.checks],
            "timings_s": self.timings,
            "notes": self.notes,
        }

    def write_json(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(json.dumps(self.to_json(), indent=2, default=str) + "\n")
        tmp.replace(path)

    def table(self, width: int | None = None) -> str:
        """The PASS/FAIL table, one row per check, then what failed and why."""
        width = width or max(100, shutil.get_terminal_size((140, 20)).columns)
        head = ("#", "TEST", "CRITERION", "MEASURED", "RESULT")
        rows = [(str(c.section), SECTIONS[c.section], c.criterion, c.measured, c.status) for c in self.checks]
        fixed = [max(len(r[i]) for r in [head, *rows]) for i in (0, 1, 4)]
        # The two free-text columns share what is left; long text wraps inside its cell.
        room = max(40, width - sum(fixed) - 8)
        criterion_w = min(max(len(r[2]) for r in [head, *rows]), max(24, room * 9 // 20))
        measured_w = max(16, room - criterion_w)
        widths = (fixed[0], fixed[1], criterion_w, measured_w, fixed[2])
        lines = [
            f"posttrade validate: run {self.run_id}, started {self.started_at:%Y-%m-%d %H:%M:%S} UTC"
            + (f", {self.seconds:.1f} s" if self.seconds is not None else "")
        ]
        for row in [head, *rows]:
            cells = [textwrap.wrap(text, w) or [""] for text, w in zip(row, widths)]
            for i in range(max(len(c) for c in cells)):
                parts = [(c[i] if i < len(c) else "").ljust(w) for c, w in zip(cells, widths)]
                lines.append("  ".join(parts).rstrip())
        failures = [c for c in self.checks if not c.passed]
        for c in failures:
            lines.append("")
            lines.append(f"FAIL {c.name}: {c.criterion}")
            for line in _evidence(c.details):
                lines.append(f"  {line}")
        for note in self.notes:
            lines.append(f"note: {note}")
        verdict = PASS if self.passed else FAIL
        lines.append("")
        lines.append(f"{verdict}: {sum(c.passed for c in self.checks)}/{len(self.checks)} checks passed")
        return "\n".join(lines)


def _evidence(details: dict[str, Any], limit: int = 12) -> list[str]:
    """The first lines of a failed check's evidence (the JSON has all of it)."""
    out: list[str] = []
    for key, value in details.items():
        if value is None or value == [] or value == {}:
            continue
        if isinstance(value, list):
            shown = value[:limit]
            out.append(f"{key}: {len(value)}" if len(value) > 1 or not shown else f"{key}:")
            out.extend(f"  {item}" for item in shown)
            if len(value) > limit:
                out.append(f"  ... {len(value) - limit} more (see the JSON)")
        else:
            text = json.dumps(value, default=str) if isinstance(value, dict) else str(value)
            out.append(f"{key}: {text[:400]}")
    return out
