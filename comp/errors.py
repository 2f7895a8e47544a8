"""The one exception type users see, and the wrapper that turns it into one line and exit 2."""

from __future__ import annotations

import sys
from collections.abc import Callable


class CompError(Exception):
    """A problem the user can fix: the message names what is wrong and what to do."""


def run_cli(body: Callable[[], int | None]) -> int:
    """Run a CLI body; a CompError becomes one line on stderr and exit status 2."""
    try:
        return body() or 0
    except CompError as exc:
        print(f"comp: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("comp: interrupted", file=sys.stderr)
        return 130
