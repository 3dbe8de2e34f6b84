"""User-facing errors: bad recipes, bad data, bad arguments.

Every stage raises `UserError` for input the user can fix. The CLI prints the message (no traceback)
and exits with code 2. Anything else is a bug in llmstages and keeps its traceback.
"""

from __future__ import annotations


class UserError(Exception):
    """An error in the user's input. `str(err)` names the file/line/key and says what to do."""

    exit_code = 2

    def __init__(self, message: str, *, hint: str | None = None):
        self.message = message
        self.hint = hint
        super().__init__(message if hint is None else f"{message}\n  fix: {hint}")


class RecipeError(UserError):
    """One or more problems in a recipe; `problems` holds `(dotted.path, message)` pairs."""

    def __init__(self, source: str, problems: list[tuple[str, str]]):
        self.source = source
        self.problems = problems
        lines = [f"{source}: {len(problems)} problem{'s' if len(problems) != 1 else ''} in the recipe:"]
        lines += [f"  {path}: {msg}" if path else f"  {msg}" for path, msg in problems]
        super().__init__("\n".join(lines))


def listed(lines: list[str], total: int | None = None, limit: int = 20) -> str:
    """Up to `limit` of `lines`, each on its own indented line, then "... and N more" for the rest of
    `total` (default: len(lines)); for messages that name every bad record without drowning the reader."""
    total = len(lines) if total is None else total
    shown = "\n".join(f"  {line}" for line in lines[:limit])
    more = total - min(len(lines), limit)
    return shown + (f"\n  ... and {more} more" if more > 0 else "")


class StopTraining(Exception):
    """Raised inside the training loop when a signal asked it to stop after committing a checkpoint."""

    def __init__(self, signum: int):
        self.signum = signum
        super().__init__(f"stopped by signal {signum}")
