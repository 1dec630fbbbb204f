"""The thin shell around every stage's main(): logging to stderr, user errors without tracebacks."""
from __future__ import annotations

import logging
import sys
from collections.abc import Callable

from pipeline.errors import UserError


def run(main: Callable[[], None]) -> None:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")
    try:
        main()
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
