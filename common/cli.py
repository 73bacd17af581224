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


EXIT_STOPPED = 3  # a run stopped by a signal (SIGINT, SIGTERM, SIGUSR1 / SIGUSR2) after its checkpoint: resumable


class RunStopped(Exception):
    """A run stopped by a signal after its checkpoint; `run_cli` prints the message (the resume
    command) and exits with EXIT_STOPPED, so schedulers and scripts can tell it from an error."""


def run_cli(main: Callable[[ArgsT], object], args_type: type[ArgsT], description: str | None = None) -> None:
    """Parse `args_type` from the command line with tyro and run `main`, turning UserError into one message."""
    args = tyro.cli(args_type, description=description)
    try:
        main(args)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    except RunStopped as stop:
        print(stop, file=sys.stderr)
        sys.exit(EXIT_STOPPED)
    except KeyboardInterrupt:  # before the training loop (loading data, compiling): nothing was saved
        print("interrupted before training started; nothing was saved.", file=sys.stderr)
        sys.exit(130)


def check(condition: bool, message: str) -> None:
    """Raise UserError(message) unless `condition` holds."""
    if not condition:
        raise UserError(message)
