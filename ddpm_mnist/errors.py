"""The one error style of every entry point (`ddpm-mnist`, `training/*.py`, `benchmarks/*.py`).

Bad input (an option value, a path, a file that cannot be read as what it should be) raises `UsageError` before any
long work starts; a failure during the work (a loss that turns NaN, an upload that fails) raises `WorkFailed`. An
entry point runs its `main` through `run_entry_point`, which prints either as one line, `<prog>: error: <message>`,
and exits with status 2 (usage) or 1 (failure), as argparse does for its own usage errors.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import NoReturn


class UsageError(ValueError):
    """Bad input: a one-line message that names the problem and the fix. Exit status 2."""


class WorkFailed(RuntimeError):
    """A failure during the work itself, after the input was accepted. Exit status 1."""


def run_entry_point(main: Callable[[], object], prog: str) -> NoReturn:
    """Run an entry point's `main`; report `UsageError` (exit 2) and `WorkFailed` (exit 1) in one line each."""
    try:
        main()
    except UsageError as error:
        print(f"{prog}: error: {error}", file=sys.stderr)
        sys.exit(2)
    except WorkFailed as error:
        print(f"{prog}: error: {error}", file=sys.stderr)
        sys.exit(1)
    sys.exit(0)
