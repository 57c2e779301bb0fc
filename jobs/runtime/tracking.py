"""MLflow for every job: the tracking URI, the client, experiments and runs, the loop's logger, the server.

* :func:`tracking_uri` — ``--tracking-uri``, else ``MLFLOW_TRACKING_URI``, else ``sqlite:///<cwd>/mlflow.db``
  made absolute, so that every worker (whatever its working directory) writes to the same store;
  :func:`sqlite_path` is the one parser of a ``sqlite:///`` URI (a ``?query`` is dropped).
* :func:`open_client`, :func:`ensure_experiment` (artifacts beside a SQLite store, not in a cwd-relative
  ``./mlruns``), :func:`find_run`, :func:`end_run` (a run always ends ``FINISHED``, ``FAILED`` or ``KILLED``).
* :class:`Tracker` — what the training loop logs through (metrics, artifacts, finish), after torchtune's
  ``MetricLoggerInterface``; a no-op on ranks other than 0, so the loop never talks to MLflow's client.
* :class:`MlflowServer` — ``mlflow server`` owning a SQLite store, for a sweep's duration; the same command
  line (:func:`server_command`) runs in the foreground as ``python -m jobs.tracking server --db FILE --port P``
  (what ``cluster/local.sh`` starts), so there is one launcher.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from capenext.cli import UsageError

SERVER_START_TIMEOUT = 180.0  # seconds for `mlflow server` to answer /health (slow on a busy 2-core box)
DEFAULT_DB = "mlflow.db"


# --- the store ---------------------------------------------------------------------------------------


def sqlite_path(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` URI, made absolute; ``None`` for any other store.

    ``sqlite:///mlflow.db`` is relative to the working directory, ``sqlite:////abs/mlflow.db`` absolute;
    a ``?query`` suffix is not part of the path.
    """
    if not uri.startswith("sqlite:///"):
        return None
    return Path(uri[len("sqlite:///"):].split("?", 1)[0]).resolve()


def tracking_uri(explicit: str | None = None) -> str:
    """``explicit``, else ``MLFLOW_TRACKING_URI``, else the SQLite store ``./mlflow.db``; a SQLite URI
    comes back with an absolute path."""
    uri = explicit or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{DEFAULT_DB}"
    db = sqlite_path(uri)
    return f"sqlite:///{db}" if db is not None else uri


def require_store(uri: str) -> str:
    """Refuse a SQLite URI whose file does not exist (reading jobs must not create an empty store)."""
    db = sqlite_path(uri)
    if db is not None and not db.is_file():
        raise UsageError(f"no MLflow store at {db} (tracking URI {uri}): set MLFLOW_TRACKING_URI or "
                         "--tracking-uri to the store or server the runs were logged to")
    return uri


def open_client(uri: str, create: bool = True):
    """An MLflow client; ``None`` when ``create`` is false and the SQLite store does not exist (so a job
    that only reads leaves no new ``mlflow.db`` behind)."""
    db = sqlite_path(uri)
    if not create and db is not None and not db.is_file():
        return None
    from mlflow.tracking import MlflowClient

    return MlflowClient(uri)


def ensure_experiment(client, name: str, uri: str) -> str:
    """The experiment's id, created when missing; with a SQLite store its artifacts go beside the file."""
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    db = sqlite_path(uri)
    artifacts = (db.parent / "mlartifacts").as_uri() if db is not None else None
    return client.create_experiment(name, artifact_location=artifacts)


def find_run(client, run_id: str | None):
    """The MLflow run, or ``None`` when there is no id or this store does not hold it."""
    if client is None or not run_id:
        return None
    try:
        return client.get_run(run_id)
    except Exception:  # MlflowException (RESOURCE_DOES_NOT_EXIST) and friends
        return None


def end_run(client, run_id: str, err: BaseException | None) -> str:
    """Close a run: ``FINISHED`` without an error, ``KILLED`` on an interrupt (Ctrl-C, SIGTERM), else
    ``FAILED``; returns the status. When the store cannot record it, one line on stderr says so (the run
    would otherwise look RUNNING for ever) and the original error goes on."""
    status = "FINISHED" if err is None else "KILLED" if isinstance(err, (KeyboardInterrupt, SystemExit)) \
        else "FAILED"
    try:
        client.set_terminated(run_id, status)
    except Exception as failure:  # the store went away
        print(f"warning: could not mark MLflow run {run_id} {status}: {' '.join(str(failure).split())[:200]}",
              file=sys.stderr, flush=True)
    return status


@contextmanager
def interrupts_raise():
    """SIGTERM raises ``KeyboardInterrupt`` in the main thread for the block (as Ctrl-C does), so a job
    stopped by ``kill``, ``ray job stop`` or a scheduler runs its ``except``/``finally`` and records its run
    as KILLED. A no-op outside the main thread."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    before = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, before)


def log_params(client, run_id: str, params: dict[str, Any]) -> None:
    """Every param, in batches of 100 (MLflow's limit), values cut to MLflow's 6000 characters."""
    from mlflow.entities import Param

    items = [Param(k, str(v)[:6000]) for k, v in params.items()]
    for i in range(0, len(items), 100):
        client.log_batch(run_id, params=items[i: i + 100])


# --- the loop's logger ------------------------------------------------------------------------------


class Tracker:
    """Rank 0's MLflow logging; every method is a no-op when ``active`` is false."""

    def __init__(self, uri: str, run_id: str, active: bool):
        self.run_id, self.client = run_id, None
        if active:
            from mlflow.tracking import MlflowClient

            self.client = MlflowClient(uri)

    def metrics(self, values: dict[str, float], step: int) -> None:
        if self.client is None or not values:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, float(v), now, step) for k, v in values.items()])

    def history(self, key: str) -> list[int]:
        """The steps already logged for ``key`` (so a restarted worker does not log an epoch twice)."""
        if self.client is None:
            return []
        return [m.step for m in self.client.get_metric_history(self.run_id, key)]

    def artifact(self, path: Path, folder: str) -> None:
        if self.client is not None:
            self.client.log_artifact(self.run_id, str(path), folder)

    def finish(self) -> None:
        if self.client is not None:
            self.client.set_terminated(self.run_id, "FINISHED")


# --- the server -------------------------------------------------------------------------------------


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def server_command(db: Path, host: str, port: int, workers: int = 1) -> list[str]:
    """``mlflow server`` owning ``db``, artifacts in ``<db dir>/mlartifacts`` (where jobs writing the store
    directly put them, so runs logged with or without the server read the same)."""
    artifacts = db.parent / "mlartifacts"
    return [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{db}",
            "--default-artifact-root", artifacts.as_uri(), "--artifacts-destination", str(artifacts),
            "--host", host, "--port", str(port), "--workers", str(workers)]


# no job-runner process: these servers only record runs (they start faster and stop cleanly)
SERVER_ENV = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}


class MlflowServer:
    """``mlflow server`` on 127.0.0.1 owning a SQLite store, for the duration of a ``with`` block.

    The server runs in its own process group; :meth:`stop` ends that group (the server and its uvicorn
    workers) and nothing else.
    """

    def __init__(self, db: Path, host: str = "127.0.0.1", port: int | None = None):
        self.db, self.host, self.port = db, host, port or free_port(host)
        self.artifacts = db.parent / "mlartifacts"
        self.log = db.parent / f"mlflow-server-{self.port}.log"
        self.proc: subprocess.Popen | None = None

    @property
    def uri(self) -> str:
        return f"http://{self.host}:{self.port}"

    def launch(self) -> None:
        """Start the server process (returns at once; :meth:`wait` waits for it to answer)."""
        self.artifacts.mkdir(parents=True, exist_ok=True)
        with open(self.log, "w") as log:
            self.proc = subprocess.Popen(server_command(self.db, self.host, self.port), stdout=log,
                                         stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         env={**os.environ, **SERVER_ENV}, start_new_session=True)
        self.started = time.time()

    def wait(self, timeout: float = SERVER_START_TIMEOUT) -> str:
        """Block until ``/health`` answers; return the server's URI. One line if it dies or never answers."""
        assert self.proc is not None, "launch() first"
        deadline = self.started + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                tail = [ln for ln in self.log.read_text(errors="replace").splitlines() if ln.strip()][-1:]
                raise UsageError(f"mlflow server for {self.db} exited with code {self.proc.returncode}: "
                                 f"{tail[0] if tail else 'no output'} (log: {self.log})")
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as r:
                    if r.status == 200:
                        return self.uri
            except OSError:
                pass
            time.sleep(0.5)
        self.stop()
        raise UsageError(f"mlflow server on {self.uri} did not answer within {timeout:.0f} s (log: {self.log})")

    def start(self, timeout: float = SERVER_START_TIMEOUT) -> str:
        self.launch()
        return self.wait(timeout)

    def stop(self, grace: float = 20.0) -> None:
        """SIGTERM to the server's process group, SIGKILL after ``grace`` seconds. Touches no other process."""
        if self.proc is None:
            return
        pgid = self.proc.pid  # start_new_session: the group is the server's own

        def alive() -> bool:
            self.proc.poll()  # reap the leader once it exits, so the group can empty
            try:
                os.killpg(pgid, 0)
                return True
            except ProcessLookupError:
                return False

        if alive():
            os.killpg(pgid, signal.SIGTERM)
        deadline = time.time() + grace
        while alive() and time.time() < deadline:
            time.sleep(0.2)
        if alive():
            os.killpg(pgid, signal.SIGKILL)
        self.proc.wait(timeout=10)
        self.proc = None

    def __enter__(self) -> "MlflowServer":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
