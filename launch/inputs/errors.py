"""Invalid-input errors of the launcher: every problem names its file, its dotted path and the reason."""

from __future__ import annotations

from dataclasses import dataclass, replace

from launch.inputs.printable import clip, printable

Loc = tuple[str | int, ...]
MAX_REASON = 1000  # characters of a problem's reason (a list of known keys runs to 600); quoted values are cut to 80


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a sweep file: where it is and why it is wrong."""

    file: str
    loc: Loc
    reason: str
    line: int | None = None

    def __post_init__(self) -> None:
        # Whatever built it, a problem renders as one bounded line: no control characters, no giant keys.
        object.__setattr__(self, "reason", clip(printable(self.reason), MAX_REASON))
        object.__setattr__(self, "loc", tuple(clip(printable(p)) if isinstance(p, str) else p for p in self.loc))

    @property
    def path(self) -> str:
        """The dotted path of the offending key (list items as `[i]`), or `<file>` for the whole file."""
        out = ""
        for part in self.loc:
            out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
        return out or "<file>"

    def render(self) -> str:
        """`file:line: path: reason` on one line."""
        where = f"{self.file}:{self.line}" if self.line else self.file
        return f"{where}: {self.path}: {self.reason}"


class InvalidSweep(Exception):
    """A sweep file that cannot be run; carries every problem found, in file order."""

    def __init__(self, problems: list[Problem]) -> None:
        unique = list(dict.fromkeys(problems))
        self.problems = unique
        super().__init__("\n".join(p.render() for p in unique))

    def with_file(self, file: str) -> InvalidSweep:
        """The same problems, attributed to `file` where they name none."""
        return InvalidSweep([p if p.file else replace(p, file=file) for p in self.problems])

    def render(self, limit: int = 20) -> str:
        """At most `limit` problems, one per line, so that the message fits one screen."""
        lines = [p.render() for p in self.problems[:limit]]
        if len(self.problems) > limit:
            lines.append(f"... and {len(self.problems) - limit} more")
        return "\n".join(lines)


class UsageError(Exception):
    """A command that cannot run as asked; printed without a traceback, exit code 2."""


class DamagedStore(Exception):
    """A run-store record the command cannot do without is unreadable; printed without a traceback, exit code 3."""
