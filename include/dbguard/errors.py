"""One exception type per failure family; each carries what a person needs to act."""
from __future__ import annotations


class DbguardError(Exception):
    """Base class: every dbguard failure a user can act on."""


class SpecError(DbguardError):
    """The spec file is malformed; `problems` lists (field, message) pairs."""

    def __init__(self, path: str, problems: list[tuple[str, str]]):
        self.path = path
        self.problems = problems
        lines = [f"{path}: {len(problems)} problem(s) in the migration spec"]
        lines += [f"  - {field}: {msg}" for field, msg in problems]
        super().__init__("\n".join(lines))


class PreflightError(DbguardError):
    """A read-only check before any write failed; `problems` lists every failing check."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("preflight failed, nothing was written:\n" + "\n".join(f"  - {p}" for p in problems))


class ConnectionFailed(DbguardError):
    """A database named by a conn_id could not be reached."""
