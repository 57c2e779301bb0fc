"""The README's main job, as a user runs it: ``python -m jobs.quickstart`` end to end (synthetic data, shards,
embeddings, Ray Train, test, MLflow), at 4 epochs instead of 12, then the two commands it prints at the end.

It runs with ``--cpus 1``: its Ray and its training worker on one CPU, beside the suite's other worker. With
all (two) CPUs, its worker's two torch threads wait on each other whenever a process of another session
(cluster/local.sh's head, an MLflow server) takes a CPU: epochs of 4.5 s took 22-290 s."""

from __future__ import annotations

import json
import os
import re
import shlex

import pytest
from mlflow.tracking import MlflowClient

from tests.conftest import in_process, run_cli

EPOCHS = 4
MARGIN = 0.05  # the full model over the per-name floor at PCK@0.2 (measured: 0.597 vs 0.481, 4 epochs, --cpus 1)


@pytest.fixture(scope="module")
def quickstart(tmp_path_factory):
    work = tmp_path_factory.mktemp("quickstart")
    proc = run_cli("jobs.quickstart", "--workdir", str(work / "out"), "--epochs", str(EPOCHS), "--cpus", "1",
                   cwd=work, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return work, proc.stdout


def _row(out: str, label: str) -> list[float]:
    (line,) = [ln for ln in out.splitlines() if ln.strip().startswith(label)]
    return [float(x) for x in line.strip()[len(label):].split()]


def test_quickstart_prints_its_table_with_the_model_above_the_floor(quickstart):
    _, out = quickstart
    assert re.search(r"PCK@0\.05\s+PCK@0\.1\s+PCK@0\.15\s+PCK@0\.2\s+PCK@0\.25\s+mPCK", out), out[-2000:]
    model, floor = _row(out, "CapeNext full (tiny)"), _row(out, "mean-position baseline")
    assert len(model) == len(floor) == 6 and all(0.0 <= v <= 1.0 for v in model + floor)
    assert model[3] >= floor[3] + MARGIN, (model, floor)
    assert model == sorted(model[:5]) + [model[5]]  # PCK grows with the threshold
    assert [f"[{i}/6]" in out for i in range(1, 7)] == [True] * 6


def test_quickstart_run_is_finished_in_its_own_mlflow_store_with_its_metrics(quickstart):
    work, out = quickstart
    client = MlflowClient(f"sqlite:///{work / 'out' / 'mlflow.db'}")
    exp = client.get_experiment_by_name("quickstart")
    (run,) = client.search_runs([exp.experiment_id])
    assert run.info.status == "FINISHED"
    assert run.data.params["optim.epochs"] == str(EPOCHS) and run.data.params["job.device"] == "cpu"
    assert run.data.params["job.cpus_per_worker"] == "1.0"  # --cpus: the worker's CPUs, and its torch threads
    model = _row(out, "CapeNext full (tiny)")
    assert run.data.metrics["test/pck_0.2"] == pytest.approx(model[3], abs=5e-4)
    assert {"floor/pck_0.2", "test/pck_mean", "train/loss", "val/pck_0.2"} <= set(run.data.metrics)
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "checkpoints")}
    assert "checkpoints/final.pt" in artifacts


def test_the_commands_it_prints_run_as_printed(quickstart, capsys, monkeypatch):
    """Each printed command, from the folder the quickstart ran in, through its module's entry in this process
    (the argv it prints; no interpreter start). Their real processes: tests/test_evaluate.py's and
    tests/test_predict.py's."""
    from jobs import evaluate, predict

    work, out = quickstart
    commands = [ln.strip() for ln in out.splitlines() if ln.strip().startswith("python -m jobs.")]
    assert [c.split()[2] for c in commands] == ["jobs.evaluate", "jobs.predict"]
    model = _row(out, "CapeNext full (tiny)")
    monkeypatch.chdir(work)
    for command in commands:
        argv = shlex.split(command)[2:]  # python -m <module> ...
        entry = {"jobs.evaluate": evaluate.main, "jobs.predict": predict.main}[argv[0]]
        proc = in_process(entry, argv[1:], capsys, monkeypatch)
        assert proc.returncode == 0, (command, proc.stderr[-2000:])
        if argv[0] == "jobs.evaluate":  # the same protocol on the same checkpoint: the same PCK@0.2
            rows = json.loads(proc.stdout.strip().splitlines()[-1])["rows"]
            assert [r["noise_variant"] for r in rows] == ["clean"]
            assert rows[0]["test/pck_0.2"] == pytest.approx(model[3], abs=5e-4)
    assert (work / "out" / "prediction.png").is_file()


def test_cpus_outside_the_machine_is_one_line_before_any_work(tmp_path, capsys, monkeypatch):
    from jobs import quickstart

    have = os.cpu_count()
    for bad in (0, have + 1):
        proc = in_process(quickstart.main, ["--workdir", str(tmp_path / "q"), "--cpus", str(bad)], capsys, monkeypatch)
        assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
        assert f"--cpus {bad}: this machine has {have} CPU" in proc.stderr and f"pass 1 to {have}" in proc.stderr
    assert not (tmp_path / "q").exists()
