"""Blueprint errors: every problem names the file, the key path and what was expected."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Problem:
    path: str  # dotted key path, e.g. "model.mixers.S.type" ("" for the whole file)
    message: str
    file: str | None = None

    def __str__(self) -> str:
        where = ": ".join(p for p in (self.file, self.path) if p)
        return f"{where}: {self.message}" if where else self.message


class BlueprintError(Exception):
    """An invalid blueprint. The CLI prints it without a traceback and exits with status 2."""

    def __init__(self, problems: list[Problem]):
        self.problems = problems
        super().__init__(str(self))

    def __str__(self) -> str:
        n = len(self.problems)
        head = "invalid blueprint" + (f" ({n} problems)" if n > 1 else "")
        return head + ":\n" + "\n".join(f"  {p}" for p in self.problems)


def dotted(loc) -> str:
    return ".".join(str(part) for part in loc)
