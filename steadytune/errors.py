"""Errors meant for people: one line each, `file:line: what is wrong, what to do`.

The CLI turns a UserError into its message on stderr and exit status 2, with no traceback.
"""


class UserError(Exception):
    """A problem the user can fix (bad input, bad config, missing file). Exit status 2."""

    exit_code = 2

    def __init__(self, message: str, problems: list[str] | None = None):
        self.problems = list(problems or [])
        super().__init__(message)

    def render(self, limit: int = 20) -> str:
        lines = [str(self)]
        shown = self.problems[:limit]
        lines += shown
        if len(self.problems) > limit:
            lines.append(f"... and {len(self.problems) - limit} more problems")
        return "\n".join(lines)


def collect(problems: list[str], header: str) -> None:
    """Raise one UserError listing every problem found, or return if there are none."""
    if problems:
        if len(problems) == 1:
            raise UserError(problems[0])
        raise UserError(f"{header} ({len(problems)} problems):", problems)
