"""What a run reports: its errors, warnings and log lines (a leaf module: every other module may use it)."""

import sys


class RecipeError(ValueError):
    """A recipe that cannot run; the message names the (dotted) key and what is allowed."""


class RecipeWarning(UserWarning):
    """A recipe that runs but probably not as intended (e.g. a budget that never evicts)."""


def log(msg: str) -> None:
    """One line of the run's log, on stderr (stdout is kept for `--validate`'s YAML)."""
    print(f"[msrnn_train] {msg}", file=sys.stderr, flush=True)
