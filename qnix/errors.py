"""The one user-facing error type: a message and a hint, printed without a traceback."""

from __future__ import annotations

from dataclasses import dataclass


class QnixError(Exception):
    """An error the user can act on. The CLI prints `message` and `hint`, exits with `exit_code`."""

    exit_code = 1

    def __init__(self, message: str, hint: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def render(self) -> str:
        return f"error: {self.message}" + (f"\n  hint: {self.hint}" if self.hint else "")


@dataclass(frozen=True, slots=True)
class Problem:
    """One thing wrong with a spec, located by file and key path."""

    file: str
    path: str
    message: str
    value: str = ""
    hint: str = ""

    def render(self) -> str:
        where = f"{self.file}: {self.path}" if self.path else self.file
        got = f" (got {self.value})" if self.value else ""
        line = f"{where}: {self.message}{got}"
        return line + (f"\n    hint: {self.hint}" if self.hint else "")


class SpecError(QnixError):
    """An invalid spec: every problem found, not just the first. Exit code 2."""

    exit_code = 2

    def __init__(self, problems: list[Problem]) -> None:
        count = len(problems)
        super().__init__(f"invalid spec: {count} problem{'s' if count != 1 else ''}")
        self.problems = problems

    def render(self) -> str:
        return "\n".join([f"error: {self.message}", *(f"  {p.render()}" for p in self.problems)])
