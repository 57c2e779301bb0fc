"""Shared command-line plumbing: one clear line and a non-zero exit on bad input.

Every entry point (``python -m pipelines.X``, ``python -m jobs.X``) wraps its ``main`` with
:func:`run_main`. Expected failures (bad data, unknown names, missing files) print ``error: <what>``
on one line to stderr and exit 2 (``CAPENEXT_DEBUG=1`` shows the traceback instead); anything
else is a bug and keeps its traceback. :func:`one_line` is the one formatter of a failure as a line,
for the entry points and for the summaries of jobs that run others (a sweep's trials, a served request).
"""

from __future__ import annotations

import os
import re
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


def one_line(err: BaseException, limit: int | None = 240) -> str:
    """A failure as one line: a user error's own message; for anything else the innermost
    ``SomeError: message`` of a (possibly remote) traceback.

    A wrapped failure is unwrapped first, by attribute, so that this module imports no Ray: a Ray task's
    exception carries its cause in ``.cause``, a Ray Train worker group's in ``.worker_failures``.
    """
    failures = getattr(err, "worker_failures", None)
    if isinstance(failures, dict) and failures:
        return one_line(next(iter(failures.values())), limit)
    cause = getattr(err, "cause", None)
    if isinstance(cause, BaseException) and cause is not err:
        return one_line(cause, limit)
    if isinstance(err, (UsageError, *USER_ERRORS)):
        text = err.args[0] if isinstance(err, KeyError) and err.args else str(err)
        return " ".join(str(text).split())[:limit]
    lines = [ln.strip() for ln in str(err).strip().splitlines() if ln.strip()]
    errs = [ln for ln in lines if re.match(r"^[\w.]+(Error|Exception|Exit|Interrupt)\b:?", ln)]
    text = errs[-1] if errs else f"{type(err).__name__}: {lines[0] if lines else ''}".rstrip(": ")
    return text[:limit]


def run_main(main: Callable[[list[str] | None], int | None], argv: list[str] | None = None) -> NoReturn:
    """Call ``main(argv)``; user errors become one line on stderr and exit code 2."""
    offline()
    try:
        code = main(argv)
    except (UsageError, *USER_ERRORS) as err:
        if os.environ.get("CAPENEXT_DEBUG"):
            raise  # the full traceback, for bug reports
        fail(one_line(err, limit=None))
    except KeyboardInterrupt:
        fail("interrupted", 130)
    raise SystemExit(code or 0)
