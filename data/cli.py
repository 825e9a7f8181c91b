"""What every data command does with bad input: one line naming the cause, no traceback."""

from __future__ import annotations

import sys
from collections.abc import Callable


def run_cli(main: Callable[[], int]) -> None:
    try:
        sys.exit(main())
    except (FileNotFoundError, ValueError, RuntimeError) as exc:
        sys.exit(f"error: {exc}")
