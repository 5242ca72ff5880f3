"""Earlier spellings of command-line flags and values: still accepted, each use warned about in one line.

    parser.add_argument("--dtype", type=renamed_values(DTYPE_RENAMES, "--dtype"), choices=DTYPES, default="fp32")
    parser.add_argument("--dtypes", nargs="+", choices=DTYPES, default=["fp32", "bf16"])
    add_renamed_flag(parser, "--precisions", "--dtypes")

`--dtype bfloat16` then parses as `--dtype bf16`, and `--precisions fp32` as `--dtypes fp32`, each printing
`warning: ... is deprecated; use ...` on stderr. A renamed flag is left out of `--help`.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Mapping, Sequence

# Earlier names of the precision values, now spelled fp32, bf16 and fp16 everywhere: the dtypes of `--dtype` and
# `--dtypes`, and the mixed precision of a training loop ("no" was accelerate's name for fp32).
DTYPE_RENAMES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}
MIXED_PRECISION_RENAMES = {"no": "fp32"}


def warn_deprecated(old: str, new: str) -> None:
    """One line on stderr: `old` still works, and `new` is how to write it."""
    print(f"warning: {old} is deprecated; use {new}.", file=sys.stderr)


def renamed_values(renames: Mapping[str, str], flag: str) -> Callable[[str], str]:
    """An argparse `type` for `flag` that turns each old value of `renames` (old -> new) into its new one, warning.

    Other values pass unchanged, for `choices` to check.
    """

    def new_value(value: str) -> str:
        if value in renames:
            warn_deprecated(f"{flag} {value}", f"{flag} {renames[value]}")
            return renames[value]
        return value

    return new_value


def add_renamed_flag(parser: argparse.ArgumentParser, old: str, new: str) -> None:
    """Accept `old` as a hidden spelling of the flag `new` (added before, a flag that takes values): the same values
    into the same destination, with a warning."""
    target = next(action for action in parser._actions if new in action.option_strings)

    class RenamedFlag(argparse.Action):
        def __call__(
            self,
            parser: argparse.ArgumentParser,
            namespace: argparse.Namespace,
            values: str | Sequence[str] | None,
            option_string: str | None = None,
        ) -> None:
            warn_deprecated(old, new)
            setattr(namespace, self.dest, values)

    parser.add_argument(
        old,
        action=RenamedFlag,
        dest=target.dest,
        nargs=target.nargs,
        type=target.type,
        choices=target.choices,
        default=argparse.SUPPRESS,
        help=argparse.SUPPRESS,
    )
