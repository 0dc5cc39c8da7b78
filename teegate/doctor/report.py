"""A check's outcome, and the whole report as text or JSON, with its exit status."""

from __future__ import annotations

import enum
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass


class Status(enum.StrEnum):
    OK = "ok"
    WARN = "warn"  # worth knowing, not a failure (the exit status stays 0)
    FAIL = "fail"  # something needed does not work: exit status 1
    SKIP = "skip"  # does not apply here (a listener switched off, a program not installed)


@dataclass(frozen=True)
class Check:
    name: str
    status: Status
    detail: str
    fix: str | None = None

    def softened(self, required: bool) -> Check:
        """A failure of a check this machine does not need is only a warning."""
        if required or self.status is not Status.FAIL:
            return self
        return Check(self.name, Status.WARN, self.detail, self.fix)


MARKS = {Status.OK: "ok  ", Status.WARN: "warn", Status.FAIL: "FAIL", Status.SKIP: "skip"}


def exit_status(checks: Sequence[Check]) -> int:
    """0 only when nothing needed failed (warnings and skips do not count)."""
    return 1 if any(c.status is Status.FAIL for c in checks) else 0


def render_text(checks: Sequence[Check]) -> str:
    lines = []
    for c in checks:
        lines.append(f"[{MARKS[c.status]}] {c.name}: {c.detail}")
        if c.fix and c.status in (Status.FAIL, Status.WARN):
            lines.extend(
                f"       fix: {line}" if i == 0 else f"            {line}"
                for i, line in enumerate(c.fix.splitlines())
            )
    failed = sum(c.status is Status.FAIL for c in checks)
    warned = sum(c.status is Status.WARN for c in checks)
    verdict = "everything needed works" if not failed else f"{failed} needed check(s) failed"
    lines.append(f"\n{verdict} ({warned} warning(s)).")
    return "\n".join(lines)


def render_json(checks: Sequence[Check]) -> str:
    return json.dumps(
        {"ok": exit_status(checks) == 0, "checks": [asdict(c) for c in checks]}, indent=2
    )
