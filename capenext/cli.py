"""Shared command-line plumbing: one clear line and a non-zero exit on bad input.

Every entry point (``python -m pipelines.X``, ``python -m jobs.X``) wraps its ``main`` with
:func:`run_main`. Expected failures (bad data, unknown names, missing files) print ``error: <what>``
on one line to stderr and exit 2 (``CAPENEXT_DEBUG=1`` shows the traceback instead); anything
else is a bug and keeps its traceback.
"""

from __future__ import annotations

import os
import sys
from typing import Callable, NoReturn

from capenext.data.mp100 import DataError

# errors a user can cause with their input; each carries a message that names what and where
USER_ERRORS = (DataError, FileNotFoundError, KeyError, ValueError)


class UsageError(Exception):
    """A problem with the command line or the environment that the user can fix."""


def offline() -> None:
    """No hub download, ever: what every entry point (and every Ray worker's entry function) sets first."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")


def fail(message: str, code: int = 2) -> NoReturn:
    print(f"error: {message}", file=sys.stderr, flush=True)
    raise SystemExit(code)


def _one_line(err: BaseException) -> str:
    text = err.args[0] if isinstance(err, KeyError) and err.args else str(err)
    return " ".join(str(text).split())


def run_main(main: Callable[[list[str] | None], int | None], argv: list[str] | None = None) -> NoReturn:
    """Call ``main(argv)``; user errors become one line on stderr and exit code 2."""
    offline()
    try:
        code = main(argv)
    except (UsageError, *USER_ERRORS) as err:
        if os.environ.get("CAPENEXT_DEBUG"):
            raise  # the full traceback, for bug reports
        fail(_one_line(err))
    except KeyboardInterrupt:
        fail("interrupted", 130)
    raise SystemExit(code or 0)
