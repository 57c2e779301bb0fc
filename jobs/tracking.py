"""An MLflow tracking server owning a SQLite store: ``python -m jobs.tracking server --db FILE --port P``.

What ``cluster/local.sh`` starts, with the same command line as the server a sweep starts for its duration
(:class:`jobs.runtime.tracking.MlflowServer`).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from capenext.cli import run_main
from jobs.runtime.tracking import SERVER_ENV, server_command


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m jobs.tracking",
        description="Run an MLflow tracking server in the foreground that owns a SQLite store (the server "
                    "cluster/local.sh and jobs.sweep start).")
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("server", help="mlflow server for one SQLite file, artifacts beside it")
    s.add_argument("--db", type=Path, required=True, help="the SQLite file (created when missing)")
    s.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    s.add_argument("--port", type=int, default=5000, help="port (default 5000)")
    s.add_argument("--workers", type=int, default=1, help="server worker processes (default 1)")
    args = p.parse_args(argv)
    db = args.db.resolve()
    db.parent.mkdir(parents=True, exist_ok=True)
    (db.parent / "mlartifacts").mkdir(exist_ok=True)
    cmd = server_command(db, args.host, args.port, args.workers)
    os.execve(cmd[0], cmd, {**os.environ, **SERVER_ENV})
    return 0


if __name__ == "__main__":
    run_main(main)
