"""Command-line entry shared by the training scripts: tyro parsing and user-facing errors."""

from __future__ import annotations

import sys
from typing import Callable, TypeVar

import tyro

ArgsT = TypeVar("ArgsT")


class UserError(Exception):
    """A problem the user can fix (bad flag, unknown env, missing dataset, unreadable checkpoint).

    Scripts let it propagate; `run_cli` prints its message alone (no traceback) and exits with 2.
    """


def run_cli(main: Callable[[ArgsT], object], args_type: type[ArgsT], description: str | None = None) -> None:
    """Parse `args_type` from the command line with tyro and run `main`, turning UserError into one message."""
    args = tyro.cli(args_type, description=description)
    try:
        main(args)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)


def check(condition: bool, message: str) -> None:
    """Raise UserError(message) unless `condition` holds."""
    if not condition:
        raise UserError(message)
