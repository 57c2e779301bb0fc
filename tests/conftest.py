"""Shared fixtures: one synthetic MP-100 and one local Ray instance per test session.

Ray start-ups cost seconds on 2 cores, so tests that need Ray share ``ray_local``; tests that run a
command line as a user would use ``run_cli`` (a real subprocess, with the project's Python).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


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
    """The default synthetic mini MP-100 (seed 0), generated once; tests must not modify it."""
    from pipelines.synthetic import generate

    root = tmp_path_factory.mktemp("synthetic") / "mp100"
    generate(root, seed=0, progress=False)
    return root


@pytest.fixture(scope="session")
def ray_local():
    """A real local Ray instance on this machine's CPUs, shared by the whole session."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def prepared(synthetic_root, ray_local, tmp_path_factory) -> Path:
    """Shards (``prepared / "shards"``) and tiny random-CLIP embeddings (``prepared / "emb"``, crop 128)
    of the synthetic set, made once per session; tests must not modify them."""
    from capenext.config import load_preset
    from pipelines import embed, shard

    base = tmp_path_factory.mktemp("prepared")
    shard.run(synthetic_root, base / "shards", progress=False)
    embed.run(base / "shards", base / "emb", load_preset("tiny"), batch_size=64, progress=False)
    return base


@pytest.fixture(scope="session")
def random_tiny_checkpoint(tmp_path_factory) -> Path:
    """A tiny CapeNext at random weights (seed 0, the random tiny CLIP), saved once per session; tests must
    not modify it."""
    import torch

    from capenext.checkpoint import save_checkpoint
    from capenext.config import load_preset
    from capenext.models import build_model

    cfg = load_preset("tiny")
    cfg.model.clip_checkpoint = "random"
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("random_tiny") / "tiny.pt"
    save_checkpoint(path, build_model(cfg.model), cfg)
    return path


def run_cli(*args: str, cwd: Path | None = None, env: dict | None = None, timeout: float = 300):
    """``python -m <args>`` as a user runs it; returns the CompletedProcess (text)."""
    full_env = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", *args], cwd=cwd or REPO, env=full_env, capture_output=True, text=True,
        timeout=timeout,
    )


def assert_one_line_error(proc, *fragments: str) -> None:
    """A non-zero exit with exactly one ``error: ...`` line on stderr that names every fragment."""
    assert proc.returncode != 0, proc.stdout + proc.stderr
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: "), lines[0]
    for frag in fragments:
        assert frag in lines[0], (frag, lines[0])
