"""The one error style of every entry point (`ddpm-mnist`, `training/*.py`, `benchmarks/*.py`).

Bad input (an option value, a path, a file that cannot be read as what it should be) raises `UsageError` before any
long work starts; a failure during the work (a loss that turns NaN, an upload that fails) raises `WorkFailed`. An
entry point runs its `main` through `run_entry_point`, which prints either as one line, `<prog>: error: <message>`,
and exits with status 2 (usage) or 1 (failure), as argparse does for its own usage errors.

The library itself refuses bad input with a ValueError (a FileNotFoundError or OSError for a path or a file that
cannot be read) in its own terms, the names of its arguments; around the calls that take user input, an entry point
turns those into a `UsageError` that names its flags with `usage_errors`.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import NoReturn


class UsageError(ValueError):
    """Bad input: a one-line message that names the problem and the fix. Exit status 2."""


class WorkFailed(RuntimeError):
    """A failure during the work itself, after the input was accepted. Exit status 1."""


@contextmanager
def usage_errors(*arguments: str, **flags: str) -> Iterator[None]:
    """Report the library's refusal of bad input, raised inside, as a `UsageError` that names the flags to fix.

    The library's messages begin with the argument they refuse (`num_inference_steps 11 is outside 1..10, ...`).
    `arguments` are those whose flag has the same name, `flags` maps the others to their flag
    (`test_digits="--test_digit"`). Each becomes its flag in the message's first line: a name with an underscore
    wherever it stands as a word of its own, a plain word such as `device` or `t` only where it begins the message.

        with usage_errors("device", "dtype"):
            pipe = load_pipeline(args.pipeline, args.device, args.dtype)
    """
    try:
        yield
    except UsageError:
        raise
    except (ValueError, OSError) as error:
        message = first_line(error)
        for name, flag in {**{name: f"--{name}" for name in arguments}, **flags}.items():
            # A word of its own: after a space, "(" or "`" (not inside a path or a quoted value), before no letter.
            where = r"(?<![^\s(`])" if "_" in name else "^"
            message = re.sub(rf"{where}{re.escape(name)}(?![\w'/])", flag, message)
        raise UsageError(message) from error


def run_entry_point(main: Callable[[], object], prog: str) -> NoReturn:
    """Run an entry point's `main`; report `UsageError` (exit 2) and `WorkFailed` (exit 1) in one line each."""
    try:
        main()
    except (UsageError, WorkFailed) as error:
        print(f"{prog}: error: {error}", file=sys.stderr)
        sys.exit(2 if isinstance(error, UsageError) else 1)
    sys.exit(0)


def first_line(error: BaseException) -> str:
    """An exception's first line, or its type's name when it has no message."""
    return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
