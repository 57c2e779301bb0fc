"""Shared fixtures: one synthetic MP-100, its shards and tables, and one local Ray instance per test process.

The suite runs in two pytest-xdist worker processes (``-n 2 --dist loadfile --no-loadscope-reorder`` in
pyproject.toml: a module's tests stay in one process, so its module fixtures are made once; modules go to
whichever worker is free, in the order :data:`FIRST` sets: the longest first, so that no long module starts
last, and the two that make the trained run apart, so that one worker does not wait for the other's). What
every worker reads - the synthetic set, the shards and tables, the
random tiny checkpoint, the trained tiny run of ``tests/test_evaluate.py`` - is made once per test run by
whichever worker asks first (:func:`shared`), the other waits for it. Ray start-ups cost seconds on 2 cores,
so tests that need Ray share ``ray_local`` (one per worker); tests that run a command line as a user would
use ``run_cli`` (a real subprocess, with the project's Python).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import pytest

REPO = Path(__file__).resolve().parents[1]

# Ray Train's controller looks at its workers every 2 s by default, and a worker's report (every epoch) waits
# for that look: a tiny test run's 0.3 s epochs took 2 s each, and its end 5-7 s more. Every Ray instance the
# tests start (in process, `ray start`, the jobs they run as users would) inherits this environment.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.25")
# Ray Train starts a preemption watcher (one more actor process) beside each worker group; nothing preempts a
# node of one machine, and the suite starts about a dozen worker groups on 2 cores. Its worker groups may
# also take longer than Ray's 60 s to start while the other pytest worker trains too.
os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "180")
# No test reads Ray's metrics or usage report, and every Ray process exports them on a timer: an idle local
# instance and the machine used 2.0 s of CPU per 30 s with metrics on, 1.7 s off (a few live through a whole run).
os.environ.setdefault("RAY_enable_metrics_collection", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_TRAIN_METRICS_ENABLED", "0")  # Ray Train's own, from each controller and worker

# the modules that take longest (seconds of one full run on 2 cores), handed out first in this order; the rest
# follow in file order. test_serve makes the trained run that test_predict and test_evaluate read: they come
# after the modules that need none of it, so that the other worker is not left waiting for it.
FIRST = ("test_sweep.py", "test_train.py", "test_serve.py", "test_quickstart.py", "test_pipelines_shard.py",
         "test_bench_gpu.py", "test_benchmarks_quick.py", "test_predict.py", "test_convert.py")


def pytest_collection_modifyitems(items: list) -> None:
    rank = {name: i for i, name in enumerate(FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(FIRST)))  # stable: file order within a rank


def shared(tmp_path_factory, name: str, build: Callable[[Path], object]) -> object:
    """``build(folder)``'s JSON-able result, made once per test run: the first worker that asks builds it into
    ``folder`` (under the run's temp root, which every xdist worker shares) while holding a lock; the others
    wait, then read its result. Without xdist, the session's temp dir."""
    from filelock import FileLock

    base = tmp_path_factory.getbasetemp()
    root = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
    folder, done = root / f"shared-{name}", root / f"shared-{name}.json"
    with FileLock(str(root / f"shared-{name}.lock")):
        if not done.is_file():
            folder.mkdir(parents=True, exist_ok=True)
            done.write_text(json.dumps(build(folder)))
    return json.loads(done.read_text())


@pytest.fixture(autouse=True)
def one_cpu_thread():
    """Torch in the test process runs on one intra-op thread: with Ray workers and subprocesses beside
    it on 2 cores, two spinning OpenMP threads made a tiny training step up to 60x slower than one."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory) -> Path:
    """The default synthetic mini MP-100 (seed 0), generated once per test run; tests must not modify it."""
    from pipelines.synthetic import generate

    def build(folder: Path) -> str:
        generate(folder / "mp100", seed=0, progress=False)
        return str(folder / "mp100")

    return Path(shared(tmp_path_factory, "synthetic", build))


@pytest.fixture(scope="session")
def ray_local():
    """A real local Ray instance on this machine's CPUs, shared by the whole session."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def prepared(synthetic_root, tmp_path_factory, request) -> Path:
    """Shards (``prepared / "shards"``) and tiny random-CLIP embeddings (``prepared / "emb"``, crop 128)
    of the synthetic set, made once per test run (on the Ray of the worker that makes them); tests must not
    modify them."""
    from capenext.config import load_preset
    from pipelines import embed, shard

    def build(base: Path) -> str:
        request.getfixturevalue("ray_local")
        shard.run(synthetic_root, base / "shards", progress=False)
        embed.run(base / "shards", base / "emb", load_preset("tiny"), batch_size=64, progress=False)
        return str(base)

    return Path(shared(tmp_path_factory, "prepared", build))


@pytest.fixture(scope="session")
def random_tiny_checkpoint(tmp_path_factory) -> Path:
    """A tiny CapeNext at random weights (seed 0, the random tiny CLIP), saved once per session; tests must
    not modify it."""
    import torch

    from capenext.checkpoint import save_checkpoint
    from capenext.config import load_preset
    from capenext.models import build_model

    def build(folder: Path) -> str:
        cfg = load_preset("tiny")
        cfg.model.clip_checkpoint = "random"
        torch.manual_seed(0)
        save_checkpoint(folder / "tiny.pt", build_model(cfg.model), cfg)
        return str(folder / "tiny.pt")

    return Path(shared(tmp_path_factory, "random_tiny", build))


def run_cli(*args: str, cwd: Path | None = None, env: dict | None = None, timeout: float = 300):
    """``python -m <args>`` as a user runs it; returns the CompletedProcess (text)."""
    full_env = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", *args], cwd=cwd or REPO, env=full_env, capture_output=True, text=True,
        timeout=timeout,
    )


def in_process(main: Callable, argv: list[str], capsys, monkeypatch) -> SimpleNamespace:
    """``python -m <module> ARGV`` in this process, through :func:`capenext.cli.run_main` as the module's entry
    runs it (no interpreter start; the worker's Ray reused): ``returncode``, ``stdout``, ``stderr``, as
    :func:`run_cli` gives them. What ``run_main`` sets in the environment is undone after the test."""
    from capenext.cli import run_main

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        run_main(main, argv)
    out = capsys.readouterr()
    return SimpleNamespace(returncode=exc.value.code, stdout=out.out, stderr=out.err)


LOCAL_SH = REPO / "cluster" / "local.sh"


def local_script(*args: str, env: dict, timeout: float = 300) -> subprocess.CompletedProcess:
    """``bash cluster/local.sh ARGS`` from the repository root, as its docs have users run it."""
    return subprocess.run(["bash", str(LOCAL_SH), *args], env=env, capture_output=True, text=True,
                          timeout=timeout, cwd=REPO)


def assert_one_line_error(proc, *fragments: str) -> None:
    """A non-zero exit with exactly one ``error: ...`` line on stderr that names every fragment."""
    assert proc.returncode != 0, proc.stdout + proc.stderr
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: "), lines[0]
    for frag in fragments:
        assert frag in lines[0], (frag, lines[0])
