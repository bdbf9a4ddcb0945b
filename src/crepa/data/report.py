"""What happened to every input file: used, or skipped with a reason. Nothing bad goes unnoticed."""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from rich.table import Table

logger = logging.getLogger("crepa.data")


@dataclass(frozen=True)
class SkippedFile:
    """One skipped input: ``problem`` is a short category (e.g. "unreadable video"), ``detail`` the specifics."""

    path: str
    problem: str
    detail: str = ""

    @property
    def reason(self) -> str:
        return f"{self.problem}: {self.detail}" if self.detail else self.problem


@dataclass
class DataReport:
    """Files used and files skipped (with reasons) while reading a dataset; print :meth:`summary` at the end."""

    used: list[str] = field(default_factory=list)
    skipped: list[SkippedFile] = field(default_factory=list)

    def use(self, path: object) -> None:
        self.used.append(str(path))

    def skip(self, path: object, problem: str, detail: str = "") -> None:
        """Record a skipped file (withdrawing it from ``used`` if it was there) and log a warning."""
        entry = SkippedFile(str(path), problem, detail)
        if entry.path in self.used:
            self.used.remove(entry.path)
        self.skipped.append(entry)
        logger.warning("skipping %s: %s", entry.path, entry.reason)

    def reason(self, path: object) -> str | None:
        """Why ``path`` was skipped (the first reason recorded), or None if it was not."""
        return next((entry.reason for entry in self.skipped if entry.path == str(path)), None)

    def problem_counts(self) -> dict[str, int]:
        return dict(Counter(entry.problem for entry in self.skipped).most_common())

    def summary(self) -> str:
        """Counts of used and skipped files, skips per problem, then each skipped file with its reason."""
        lines = [f"{len(self.used)} used, {len(self.skipped)} skipped"]
        lines += [f"  {problem}: {count}" for problem, count in self.problem_counts().items()]
        lines += [f"  - {entry.path}: {entry.reason}" for entry in self.skipped]
        return "\n".join(lines)

    def table(self, title: str = "skipped inputs") -> Table:
        """The skipped files as a rich table (file, problem, detail)."""
        from rich.table import Table

        table = Table(
            "file",
            "problem",
            "detail",
            title=f"{title}: {len(self.skipped)} of {len(self.used) + len(self.skipped)}",
        )
        for entry in self.skipped:
            table.add_row(entry.path, entry.problem, entry.detail)
        return table
