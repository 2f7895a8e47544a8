"""The one exception type users see (and its time-limit kind), and the wrapper that turns it into one line and exit 2
(3: stopped by a time limit)."""

from __future__ import annotations

import sys
from collections.abc import Callable


class CompError(Exception):
    """A problem the user can fix: the message names what is wrong and what to do."""


class OutOfTime(CompError):
    """A time limit was reached at a checkpoint or between folds: what is finished is kept, a rerun continues."""


STOPPED = 3  # the exit status of a command stopped by its time limit


def run_cli(body: Callable[[], int | None]) -> int:
    """Run a CLI body; a CompError becomes one line on stderr and exit status 2."""
    try:
        return body() or 0
    except OutOfTime as exc:
        print(f"comp: {exc}", file=sys.stderr)
        return STOPPED
    except CompError as exc:
        print(f"comp: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("comp: interrupted", file=sys.stderr)
        return 130
