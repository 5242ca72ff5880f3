"""The `ddpm-mnist` command line."""

from __future__ import annotations

import argparse

from . import __version__


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of `ddpm-mnist`; each capability adds a sub-command."""
    parser = argparse.ArgumentParser(
        prog="ddpm-mnist",
        description="DDPM (Ho et al. 2020) on MNIST. Train with `accelerate launch training/train.py`.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `ddpm-mnist` console script."""
    build_parser().parse_args(argv)
    return 0
