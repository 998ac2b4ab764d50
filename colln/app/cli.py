"""What every colln command shares: error reporting, exit codes, argument parsing helpers.

A :class:`CollnError` prints ``colln: error: <stage>: <message>`` and exits with its ``exit_code``
(2, or 1 for a failed validation); the traceback only with ``--verbose``.
"""

from __future__ import annotations

import argparse
import sys
import traceback
from collections.abc import Callable, Sequence

from colln.errors import CollnError, UsageError


class ArgumentParser(argparse.ArgumentParser):
    """argparse that reports bad arguments in colln's one-line error format (exit 2)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(message)


def run_main(
    main: Callable[[argparse.Namespace], int | None],
    parser: argparse.ArgumentParser,
    argv: Sequence[str] | None = None,
) -> int:
    """Parse ``argv`` and run ``main``; turn CollnError into colln's error line and exit code."""
    verbose = "--verbose" in (sys.argv[1:] if argv is None else argv)
    try:
        args = parser.parse_args(argv)
        return int(main(args) or 0)
    except CollnError as exc:
        if verbose:
            traceback.print_exc()
        print(f"colln: error: {exc.stage}: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("colln: error: interrupted", file=sys.stderr)
        return 130


def parse_floats(
    text: str,
    what: str,
) -> tuple[float, ...]:
    """``"0.5,0.7"`` -> ``(0.5, 0.7)``; a clear UsageError otherwise."""
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise UsageError(f"{what} must be a number or comma-separated numbers, got {text!r}") from None
    return values


def parse_ints(
    text: str,
    what: str,
) -> tuple[int, ...]:
    """``"3,6,9"`` -> ``(3, 6, 9)``; a clear UsageError otherwise."""
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip() != "")
    except ValueError:
        raise UsageError(f"{what} must be comma-separated integers like 3,6,9, got {text!r}") from None
    if not values:
        raise UsageError(f"{what} is empty: give comma-separated integers like 3,6,9")
    return values
