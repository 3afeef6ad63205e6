"""What a config converter did with each key of the source config, as a printed table.

Both converters (InternEvo and XTuner) account for every key: mapped to an evotune
setting, ignored with the reason, or NOT REPRODUCED (an approximation that stops the
conversion unless the user allows it).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class KeyReport:
    source: str  # "InternEvo", "XTuner": names the first column
    rows: list[tuple[str, str, str, str]] = field(default_factory=list)
    approximations: list[str] = field(default_factory=list)
    unreadable: list[str] = field(default_factory=list)

    def mapped(self, key: str, value: Any, setting: str, note: str = "") -> None:
        self.rows.append((key, short(value), setting, note))

    def ignored(self, key: str, value: Any, reason: str) -> None:
        self.rows.append((key, short(value), "(ignored)", reason))

    def approximate(self, key: str, value: Any, reason: str) -> None:
        self.rows.append((key, short(value), "(NOT REPRODUCED)", reason))
        self.approximations.append(f"{key}={short(value)} ({reason})")

    def table(self) -> str:
        header = (f"{self.source} key", "value", "evotune setting", "note")
        widths = [max(len(row[i]) for row in [*self.rows, header]) for i in range(3)]
        lines = []
        for row in [header, *self.rows]:
            cells = [row[i].ljust(widths[i]) for i in range(3)]
            lines.append("  ".join(cells) + ("  " + row[3] if row[3] else ""))
        for failure in self.unreadable:
            lines.append(f"could not read: {failure}")
        return "\n".join(lines)


def short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 48 else text[:45] + "..."
