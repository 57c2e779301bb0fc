"""The sweep for real, on the one-machine route the docs give users: ``cluster/local.sh start`` (a Ray head and
an MLflow server on 127.0.0.1, token authentication), then ``ray job submit`` of a tiny sweep (3 splits of one
ablation: trials A, B and C, tiny configs, 4 epochs of 3 steps) with the environment ``local.sh`` prints,
checked with ``MlflowClient``:

1. the first submission (two trials at a time: A and B, then C as soon as one of them is done) is stopped
   (the job API's stop, as ``ray job stop``) once A and B have finished and C has written its first epoch's
   checkpoint: C really stopped mid-run, and its run and the parent are KILLED;
2. re-submitted, A and B are skipped and C ends FINISHED, continuing its own MLflow run from its checkpoint
   (its first epoch not run again); ``jobs.report`` reads the store these trials wrote;
3. after ``local.sh stop``, the sweep's route for a SQLite store: submitted once more (in this process, on the
   session's Ray) with the store ``local.sh`` kept, after A was left RUNNING (killed after its last
   checkpoint) and B's checkpoint was torn. It starts its own ``mlflow server`` on the file, its trials log
   through it, and it stops it at the end: C (finished) is skipped, A goes straight to its test in its own
   run, B fails with its reason, and the sweep fails.

The first two submissions log to ``local.sh``'s MLflow server: the head passes its ``MLFLOW_TRACKING_URI`` to
the jobs it runs, so the submissions set none (docs/sweep.md).

``cluster/local.sh`` itself is checked here, not in ``tests/test_cluster.py``: the sweep runs on the head it
starts, so a test run starts one Ray head fewer (seconds of CPU on 2 cores), and pytest-xdist hands out whole
modules, so the check and the sweep must share this one. The first test makes every check while it runs
(the exports and env.sh, the dashboard with the bearer token, the MLflow server owning its SQLite store, what
listens where, ``status``, a second ``start`` refused in one line); the test after the sweep's runs ``local.sh
stop`` and checks that both are gone (the fixture stops them too when that test did not run).

Isolation from the rest of the session (``ray_local`` runs an in-process Ray): ``local.sh`` gives the head its
own ``--temp-dir`` (so no ``ray.init()`` finds it) and the fixture its own free ports, ``RAY_ADDRESS`` and the
other exports are set only in the subprocesses' environment, and the head is stopped by ``local.sh stop``,
which ends the ``ray start --block`` process it started - not ``ray stop``, which would end every Ray process
on the machine, the session's own instance included.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from capenext.cli import run_main
from jobs import sweep
from jobs.runtime.tracking import free_port
from tests.conftest import REPO, in_process, local_script

EXPERIMENT = "tinysweep"
TRIALS = [f"{EXPERIMENT}-split{k}-full-tiny" for k in (1, 2, 3)]  # A, B, C: the order the sweep starts them
TINY_SWEEP = ["--splits", "1-3", "--ablations", "full", "--backbones", "tiny", "--experiment", EXPERIMENT,
              "--clip-model", "tiny", "--clip-checkpoint", "random", "--batch-size", "8", "--epochs", "4",
              "--max-steps", "3", "--val-episodes", "1", "--episodes", "2", "--queries", "4",
              "--set", "model.dropout=0.0", "--cpus-per-worker", "0.5",
              # two trials at a time: four Ray Train runs at once (each a controller, a worker and helper
              # actors) came within 1 GB of the 24 GB machine's memory beside the rest of the suite
              "--max-concurrent", "2"]


# --- cluster/local.sh: the Ray head (and MLflow server) the sweep runs on ---------------------------------


def _env_file(text: str) -> dict[str, str]:
    return dict(re.findall(r"^export (\w+)=(\S+)", text, flags=re.M))


def _listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False


# what docs/sweep.md ("What listens where") names as listening beyond loopback: Ray's own servers, which
# bind every interface whatever --node-ip-address says (GCS, raylet, its agents and worker processes)
RAY_WIDE_LISTENERS = re.compile(r"gcs_server|raylet|^ray::|ray/dashboard/agent\.py|ray/_private/runtime_env/agent"
                                r"|ray[./]util[./]client[./]server|ray/_private/log_monitor|ray/autoscaler|ray/dashboard/dashboard\.py")


def _listeners(root_pids: list[int]) -> list[tuple[str, int, str]]:
    """(address, port, process) of every TCP listener of these processes and their descendants."""
    import ray  # noqa: F401  (puts the psutil Ray ships with on sys.path)

    import psutil

    procs = {}
    for pid in root_pids:
        p = psutil.Process(pid)
        for q in [p, *p.children(recursive=True)]:
            procs[q.pid] = " ".join(q.cmdline()) or q.name()
    out = []
    for conn in psutil.net_connections(kind="tcp"):
        if conn.status == psutil.CONN_LISTEN and conn.pid in procs:
            out.append((conn.laddr.ip, conn.laddr.port, procs[conn.pid]))
    return out


def _drop_ray_tmp(state: Path) -> None:
    """Remove the temp dir a failed ``start`` left (``stop`` removes a running head's)."""
    marker = state / "state" / "ray_tmp"
    if marker.is_file() and marker.read_text().strip().startswith("/tmp/cnray."):
        shutil.rmtree(marker.read_text().strip(), ignore_errors=True)
        marker.unlink()


@pytest.fixture(scope="module")
def local_sh(tmp_path_factory):
    """``cluster/local.sh start`` with its state in a temp dir, 2 CPUs and no GPU, on free ports of its own:
    ``{"state", "env", "started" (the CompletedProcess), "pids" (ray, mlflow; empty if it did not start)}``.
    2 CPUs, as the sweep's own head had: its two trials at a time hold 0.5 each (the trial tasks and Train
    controllers none), and the worker processes Ray keeps warm follow the CPU count. A start that lost a port
    between local.sh choosing and binding it is tried again (3 times in all). Stops both at teardown unless
    the last test did."""
    state = tmp_path_factory.mktemp("local_sh") / "local"
    env = {**os.environ, "PYTHON": sys.executable,
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    env.pop("RAY_ADDRESS", None)
    for _ in range(3):
        ports = [str(free_port()) for _ in range(3)]  # never 6379/8265/5000: another Ray or MLflow may be there
        started = local_script("start", "--dir", str(state), "--num-cpus", "2", "--num-gpus", "0",
                               "--ray-port", ports[0], "--dashboard-port", ports[1], "--mlflow-port", ports[2],
                               env=env)
        logs = " ".join(p.read_text(errors="replace") for p in (state / "logs").glob("*.log")).lower()
        if started.returncode == 0 or "did not come up" not in started.stderr or "already in use" not in logs:
            break
        _drop_ray_tmp(state)
    pids = {}
    if started.returncode == 0:
        pids = {name: int((state / "state" / f"{name}.pid").read_text()) for name in ("ray", "mlflow")}
    yield {"state": state, "env": env, "started": started, "pids": pids}
    if any((state / "state" / f"{name}.pid").is_file() for name in ("ray", "mlflow")):
        # the stopping test did not run (or failed)
        local_script("stop", "--dir", str(state), env=env, timeout=120)
    _drop_ray_tmp(state)


@pytest.fixture(scope="module")
def ray_head(local_sh):
    """The head ``local.sh`` started, as ``ray job submit`` reaches it: the dashboard's address, its token,
    the environment for the subprocesses (the Ray exports ``local.sh`` prints, as the docs have users source
    them), and the MLflow server the head gives its jobs (``mlflow``)."""
    started = local_sh["started"]
    assert started.returncode == 0, started.stdout + started.stderr
    exports = _env_file(started.stdout)
    client_env = {**local_sh["env"], **{k: v for k, v in exports.items() if k.startswith("RAY_")}}
    return {"dashboard": exports["RAY_API_SERVER_ADDRESS"], "env": client_env,
            "token": Path(exports["RAY_AUTH_TOKEN_PATH"]).read_text().strip(), "mlflow": exports["MLFLOW_TRACKING_URI"]}


def test_local_script_starts_ray_and_mlflow_on_loopback_with_token_auth(local_sh):
    state, env, started, pids = local_sh["state"], local_sh["env"], local_sh["started"], local_sh["pids"]
    assert started.returncode == 0, started.stdout + started.stderr
    exports = _env_file(started.stdout)
    assert set(exports) == {"RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN_PATH",
                            "MLFLOW_TRACKING_URI"}
    assert exports == _env_file((state / "env.sh").read_text())
    assert "Ray head:" in started.stdout and "MLflow server:" in started.stdout
    dashboard, uri = exports["RAY_API_SERVER_ADDRESS"], exports["MLFLOW_TRACKING_URI"]
    assert dashboard.startswith("http://127.0.0.1:") and uri.startswith("http://127.0.0.1:")
    token = Path(exports["RAY_AUTH_TOKEN_PATH"]).read_text().strip()
    request = urllib.request.Request(f"{dashboard}/api/version", headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(request, timeout=10) as r:
        assert r.status == 200
    # the server owns the SQLite store in the state dir: a run logged through it lands there
    client = MlflowClient(uri)
    exp = client.create_experiment("local-check")
    run = client.create_run(exp)
    client.log_metric(run.info.run_id, "x", 1.0)
    direct = MlflowClient(f"sqlite:///{state / 'mlflow.db'}")
    assert direct.get_run(run.info.run_id).data.metrics == {"x": 1.0}
    assert local_script("status", "--dir", str(state), env=env).returncode == 0
    # what listens where: the dashboard (job API) and MLflow on loopback only; beyond loopback only
    # the Ray servers the docs name
    listeners = _listeners([pids["ray"], pids["mlflow"]])
    dash_port, mlflow_port = (int(a.rsplit(":", 1)[1]) for a in (dashboard, uri))
    loopback = {"127.0.0.1", "::1", "::ffff:127.0.0.1"}
    assert {ip for ip, port, _ in listeners if port in (dash_port, mlflow_port)} <= loopback, listeners
    assert any(port == mlflow_port for _, port, _ in listeners)
    wide = [(ip, port, who) for ip, port, who in listeners if ip not in loopback]
    assert all(RAY_WIDE_LISTENERS.search(who) for _, _, who in wide), wide
    mlflow_group = _listeners([pids["mlflow"]])
    assert mlflow_group and all(ip in loopback for ip, _, _ in mlflow_group), mlflow_group
    again = local_script("start", "--dir", str(state), env=env)
    assert again.returncode == 2 and again.stderr.strip().startswith("error: ") and "already running" in \
        again.stderr and len(again.stderr.strip().splitlines()) == 1


# --- the sweep, submitted to that head ------------------------------------------------------------------


@pytest.fixture(scope="module")
def sweep_data(prepared, tmp_path_factory):
    """The session's shards and tiny random-CLIP embeddings, copied to a folder of their own outside the
    repo, where the sweep's runs and store go."""
    base = tmp_path_factory.mktemp("sweep_data")
    for part in ("shards", "emb"):
        shutil.copytree(prepared / part, base / part)
    return base


def _submit_command(ray_head, data: Path, *submit_options: str) -> list[str]:
    """``ray job submit --working-dir <repo> --runtime-env-json ... -- python -m jobs.sweep ...``, with no
    ``MLFLOW_TRACKING_URI``: the job logs to the head's MLflow server."""
    runtime_env = {
        "excludes": [".venv", ".git", "runs", "mlruns", "mlartifacts", "*.db", "quickstart_out", "report"],
        "env_vars": {"HF_HUB_OFFLINE": "1"},
    }
    # no --address: RAY_API_SERVER_ADDRESS and the token come from local.sh's exports (ray_head["env"])
    return [str(Path(sys.executable).parent / "ray"), "job", "submit", *submit_options, "--working-dir", str(REPO),
            "--runtime-env-json", json.dumps(runtime_env), "--",
            sys.executable, "-m", "jobs.sweep", *TINY_SWEEP, "--shards", str(data / "shards"),
            "--embeddings", str(data / "emb"), "--storage-path", str(data / "runs")]


def _submit(ray_head, data: Path, log: str) -> subprocess.CompletedProcess:
    """One submission, waited for."""
    proc = subprocess.run(_submit_command(ray_head, data), env=ray_head["env"], cwd=data, capture_output=True,
                          text=True, timeout=420)
    (data / log).write_text(proc.stdout + proc.stderr)  # for a failing test's post-mortem
    return proc


def _epochs_done(data: Path, name: str) -> int:
    """How many epochs the trial's newest whole checkpoint holds (0: none)."""
    done = 0
    for path in (data / "runs" / name).glob("checkpoint_*/progress.json"):
        try:
            done = max(done, json.loads(path.read_text())["epoch"] + 1)
        except (OSError, ValueError, KeyError):  # being written
            continue
    return done


def _stop_job(ray_head, submission_id: str) -> None:
    """The job API's stop (what ``ray job stop`` calls): the sweep's driver gets SIGTERM."""
    request = urllib.request.Request(f"{ray_head['dashboard']}/api/jobs/{submission_id}/stop", method="POST",
                                     headers={"Authorization": f"Bearer {ray_head['token']}"})
    with urllib.request.urlopen(request, timeout=30) as r:
        assert json.loads(r.read())["stopped"] is True


def _children(client: MlflowClient) -> dict[str, object]:
    """The newest child run of each trial (a trial stopped before its first checkpoint starts a new one)."""
    exp = client.get_experiment_by_name(EXPERIMENT)
    runs = client.search_runs([exp.experiment_id], order_by=["attributes.start_time DESC"])
    newest: dict[str, object] = {}
    for r in runs:
        if r.data.tags.get("capenext.kind") != "sweep":
            newest.setdefault(r.data.tags["capenext.run_name"], r)
    return newest


def _parent(client: MlflowClient):
    exp = client.get_experiment_by_name(EXPERIMENT)
    (parent,) = client.search_runs([exp.experiment_id], f"tags.`capenext.sweep` = '{EXPERIMENT}'")
    return parent


@pytest.fixture(scope="module")
def stopped_sweep(ray_head, sweep_data):
    """The first submission, stopped once A and B have finished and C has its first epoch's checkpoint:
    ``(output, the trials finished, the trial stopped mid-run, its MLflow run id and its logged losses)``."""
    import threading

    submission = f"tinysweep-{secrets.token_hex(4)}"
    proc = subprocess.Popen(_submit_command(ray_head, sweep_data, "--submission-id", submission),
                            env=ray_head["env"], cwd=sweep_data, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
    reader.start()
    deadline, stopped = time.time() + 300, None
    while stopped is None and proc.poll() is None and time.time() < deadline:
        finished = [ln.split()[1].rstrip(":") for ln in list(lines)
                    if re.match(rf"\[\d/{len(TRIALS)}\] \S+: finished", ln)]
        if len(finished) == 2:
            stopped = next((n for n in TRIALS if n not in finished and _epochs_done(sweep_data, n) >= 1), None)
        time.sleep(0.1)
    (sweep_data / "stopped_sweep.log").write_text("".join(lines))  # for a failing test's post-mortem
    assert stopped is not None, "the third trial wrote no checkpoint: " + "".join(lines)[-4000:]
    _stop_job(ray_head, submission)
    proc.wait(timeout=120)
    reader.join(timeout=30)
    out = "".join(lines)
    (sweep_data / "stopped_sweep.log").write_text(out)
    assert f"Job '{submission}' was stopped" in out, out[-4000:]
    # two at a time: A and B first, C only once one of them was done
    assert sorted(finished) == TRIALS[:2] and stopped == TRIALS[2], out[-4000:]
    starts = [i for i, ln in enumerate(out.splitlines()) if ln.startswith("[start] ")]
    first_done = next(i for i, ln in enumerate(out.splitlines()) if re.match(rf"\[1/{len(TRIALS)}\] ", ln))
    assert len(starts) == 3 and starts[1] < first_done < starts[2], out[-4000:]
    client = MlflowClient(ray_head["mlflow"])
    run = _children(client)[stopped]
    assert _epochs_done(sweep_data, stopped) < 4, out[-4000:]  # mid-run
    # the sweep ran its clean-up on the stop's SIGTERM (Ray's own handler would have ended it on the spot)
    assert run.info.status == "KILLED" and _parent(client).info.status == "KILLED", out[-4000:]
    return out, finished, stopped, run.info.run_id, _history(client, run.info.run_id)


def _history(client: MlflowClient, run_id: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, "train/loss"))


@pytest.fixture(scope="module")
def first_sweep(stopped_sweep, ray_head, sweep_data):
    """The stopped sweep submitted again, waited for: (the process, the MLflow server's URI)."""
    proc = _submit(ray_head, sweep_data, "first_sweep.log")
    return proc, ray_head["mlflow"]


def test_a_sweep_stopped_mid_run_resumes_its_trial_in_its_own_run(stopped_sweep, first_sweep, sweep_data):
    _, finished, stopped, run_id, logged = stopped_sweep
    proc, uri = first_sweep
    out = proc.stdout + proc.stderr
    assert "found again: a re-submitted sweep" in out and "sweep: skipping 2 trials that finished before" in out
    summary = {line.split()[0]: line.split()[1] for line in out.splitlines() if line.startswith(f"{EXPERIMENT}-split")}
    assert summary == {**{name: "skipped" for name in finished}, stopped: "finished"}
    assert re.search(rf"\[start\] {stopped} \(split \d, \w+, tiny\): resuming from checkpoint_", out), out[-4000:]
    client = MlflowClient(uri)
    run = _children(client)[stopped]
    assert run.info.run_id == run_id and run.info.status == "FINISHED"
    history = _history(client, run_id)
    assert [s for s, _ in history] == [0, 1, 2, 3] and logged and history[:len(logged)] == logged  # not run again
    latest = max((sweep_data / "runs" / stopped).glob("checkpoint_*/state.pt"), key=lambda p: p.stat().st_mtime)
    assert torch.load(latest, weights_only=True)["step"] == 12  # 4 epochs x 3 steps in all, over two submissions


def test_ray_job_submit_runs_every_trial_as_a_child_run(first_sweep, sweep_data):
    proc, uri = first_sweep
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]
    assert f"MLflow: tracking server {uri}" in out  # the head's, with no MLFLOW_TRACKING_URI in the submission
    # two trials finished in the stopped submission: this one runs the third
    assert "1 finished, 2 skipped (finished before), 0 failed, of 3 trials" in out, out[-4000:]
    assert "1 trials to run, 2 at a time" in out
    client = MlflowClient(uri)
    parent = _parent(client)
    assert parent.info.status == "FINISHED" and parent.data.metrics["sweep/finished"] == 3
    children = _children(client)
    assert sorted(children) == sorted(TRIALS)
    for name, run in children.items():
        tags = run.data.tags
        assert run.info.status == "FINISHED", name
        assert tags["mlflow.parentRunId"] == parent.info.run_id
        assert (tags["split"], tags["ablation"], tags["backbone"]) == tuple(re.match(
            rf"{EXPERIMENT}-split(\d)-(\w+)-(tiny)$", name).groups())
        assert 0.0 <= run.data.metrics["test/pck_0.2"] <= 1.0 and "floor/pck_0.2" in run.data.metrics
        assert [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")] == [0, 1, 2, 3]
        assert client.get_metric_history(run.info.run_id, "val/pck_0.2")
        assert (sweep_data / "runs" / name).is_dir()  # checkpoints on the storage path, outside the working dir


def test_report_over_the_sweeps_own_runs(first_sweep, tmp_path, capsys):
    """``jobs.report`` over the store the real trials wrote: each cell is the mean of the trials' own logged
    test PCK over the three splits, every run carries its recipe and departures, the paper column is there."""
    import csv

    from jobs import report

    _, uri = first_sweep
    with pytest.raises(SystemExit) as exc:
        run_main(report.main, ["--experiment", EXPERIMENT, "--tracking-uri", uri, "--out", str(tmp_path),
                               "--with-paper"])
    assert exc.value.code == 0, capsys.readouterr().err
    children = _children(MlflowClient(uri))
    rows = {r[0]: r for r in csv.reader((tmp_path / "pck_thresholds.csv").open())}
    header = rows.pop("Ablation")
    logged = [children[name].data.metrics["test/pck_0.2"] for name in TRIALS]
    cell = rows["full"]
    assert cell[header.index("Splits")] == "3"
    assert float(cell[header.index("PCK@0.2")]) == pytest.approx(100 * sum(logged) / 3, abs=0.006)
    runs = list(csv.DictReader((tmp_path / "runs.csv").open()))
    assert sorted(r["run_name"] for r in runs) == sorted(TRIALS)
    assert {r["recipe"] for r in runs} == {"default"}
    assert all("model.backbone tiny" in r["paper_departures"] for r in runs)
    table1 = list(csv.reader((tmp_path / "table1.csv").open()))
    assert any("paper (published)" in row for row in table1)
    assert "### How far from the paper" in (tmp_path / "report.md").read_text()


def test_local_script_stop_ends_both_and_keeps_the_store(local_sh, first_sweep, sweep_data, ray_local, capsys,
                                                         monkeypatch):
    """``local.sh stop`` after the sweep's submissions: the last test on the head. The store it keeps is a
    SQLite file the sweep can take again: submitted once more (in this process, on the session's Ray) with
    that file as its store, after trial A was left RUNNING (as if killed after its last checkpoint) and B's
    checkpoint was torn. The sweep starts its own ``mlflow server`` on the file and its trials log through it:
    C (finished) is skipped, A goes straight to its test in its own run, B fails with its reason, the sweep
    fails, and the server is stopped."""
    state, env, pids = local_sh["state"], local_sh["env"], local_sh["pids"]
    assert pids, "local.sh did not start: " + local_sh["started"].stdout + local_sh["started"].stderr
    exports = _env_file(local_sh["started"].stdout)
    stopped = local_script("stop", "--dir", str(state), env=env, timeout=120)
    assert stopped.returncode == 0, stopped.stdout + stopped.stderr
    for name, pid in pids.items():
        assert not _alive(pid), name
        with pytest.raises(ProcessLookupError):
            os.killpg(pid, 0)  # nothing left of either process group
    for address in (exports["RAY_API_SERVER_ADDRESS"], exports["MLFLOW_TRACKING_URI"]):
        assert not _listening(int(address.rsplit(":", 1)[1]))
    assert not (state / "env.sh").exists() and (state / "mlflow.db").is_file()  # the store stays
    assert local_script("status", "--dir", str(state), env=env).returncode == 1

    store = f"sqlite:///{state / 'mlflow.db'}"
    client = MlflowClient(store)
    before = _children(client)
    parent_id = _parent(client).info.run_id
    killed, torn, done = TRIALS  # A, B, C: all three finished in the submissions above
    tested = len(client.get_metric_history(before[killed].info.run_id, "test/pck_0.2"))
    for name in (killed, torn):  # A killed after its last checkpoint (its run left RUNNING); B's checkpoint torn
        client.update_run(before[name].info.run_id, status="RUNNING")
    for model in (sweep_data / "runs" / torn).glob("checkpoint_*/model.pt"):
        model.write_bytes(b"torn")

    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    argv = [*TINY_SWEEP, "--shards", str(sweep_data / "shards"), "--embeddings", str(sweep_data / "emb"),
            "--storage-path", str(sweep_data / "runs")]
    proc = in_process(sweep.main, argv, capsys, monkeypatch)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out[-6000:]
    assert f"MLFLOW_TRACKING_URI {store} is a SQLite store" in out
    assert "starts `mlflow server` on http://127.0.0.1:" in out and "found again: a re-submitted sweep" in out
    assert f"{killed} (split 1, full, tiny): resuming from" in out
    assert "sweep: skipping 1 trials that finished before" in out and "2 trials to run, 2 at a time" in out
    assert "1 finished, 1 skipped (finished before), 1 failed, of 3 trials" in out, out[-4000:]
    summary = {line.split()[0]: line for line in out.splitlines() if line.startswith(f"{EXPERIMENT}-split")}
    assert summary[torn].split()[1] == "failed" and "is cut short (model.pt is 4 bytes of the" in summary[torn]
    assert summary[killed].split()[1] == "finished" and summary[done].split()[1] == "skipped"
    assert f"error: 1 of 3 trials failed: {torn}" in out
    port = int(re.search(r"server up on http://127\.0\.0\.1:(\d+)", out).group(1))
    assert f"MLflow: stopping the server on http://127.0.0.1:{port}" in out and not _listening(port)

    after = _children(client)
    assert sorted(after) == sorted(TRIALS)  # no new runs: the resumed trial continued its own
    assert after[killed].info.run_id == before[killed].info.run_id and after[killed].info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(after[killed].info.run_id, "train/loss")] == [0, 1, 2, 3]
    # its test ran again, logged through the sweep's own server
    assert len(client.get_metric_history(after[killed].info.run_id, "test/pck_0.2")) == tested + 1
    assert after[torn].info.status == "FAILED"
    assert after[done].info.status == "FINISHED" and after[done].info.end_time == before[done].info.end_time
    parent = _parent(client)
    assert parent.info.run_id == parent_id and parent.info.status == "FAILED"


def test_split_forms():
    assert sweep.parse_splits("1-5") == [1, 2, 3, 4, 5]
    assert sweep.parse_splits("1,3") == [1, 3]
    assert sweep.parse_splits("1-2,5,2") == [1, 2, 5]


def test_every_training_option_reaches_each_trial_as_jobs_train_parses_it(tmp_path):
    """A trial's run is the one ``jobs.train`` builds from the same options: the fine-tuning options among them."""
    from jobs import train
    from jobs.training.spec import from_args, resolve_config

    options = ["--shards", str(tmp_path), "--embeddings", str(tmp_path), "--clip-checkpoint", "random",
               "--init-checkpoint", "runs:/abc/checkpoints/final.pt", "--freeze", "backbone,encoder",
               "--epochs", "3", "--set", "optim.lr=1e-4", "--val-episodes", "5", "--storage-path", str(tmp_path),
               "--device", "cpu", "--tracking-uri", "http://127.0.0.1:1"]
    args = sweep.parse_args(["--splits", "2", "--ablations", "baseline", "--backbones", "tiny", "--seeds", "7",
                             *options])
    [trial] = sweep.plan(args)
    got = sweep.trial_run(args, trial, "parent")
    targs = train.parse_args(["--split", "2", "--ablation", "baseline", "--backbone", "tiny", *options,
                              "--seed", "7", "--run-name", trial.run_name, "--parent-run-id", "parent"])
    want = from_args(targs, resolve_config(targs), 2, trial.run_name, "parent")
    assert got == want
    assert got.init_checkpoint == "runs:/abc/checkpoints/final.pt" and got.freeze == ("backbone", "encoder")
    assert got.tracking_uri == "http://127.0.0.1:1" and got.device == "cpu"
    cfg = got.cfg
    assert (cfg.optim.lr, cfg.optim.epochs, cfg.optim.seed, cfg.model.ablation) == (1e-4, 3, 7, "baseline")


def test_a_text_encoder_other_than_clip_names_the_trials_apart(tmp_path):
    """Sweeps of one experiment with CLIP's and a prior's text embeddings never share a run name (a run is
    resumed by its name)."""
    common = ["--splits", "1", "--ablations", "full,cls_only", "--backbones", "tiny", "--seeds", "0,1",
              "--shards", str(tmp_path), "--embeddings", str(tmp_path), "--clip-checkpoint", "random",
              "--experiment", "study"]
    clip = [t.run_name for t in sweep.plan(sweep.parse_args(common))]
    prior = sweep.plan(sweep.parse_args([*common, "--set", "model.text_encoder=wordllama"]))
    assert clip == ["study-split1-full-tiny-seed0", "study-split1-full-tiny-seed1",
                    "study-split1-cls_only-tiny-seed0", "study-split1-cls_only-tiny-seed1"]
    assert [t.run_name for t in prior] == [n.replace("-tiny-", "-tiny-wordllama-") for n in clip]
    assert sweep.trial_run(sweep.parse_args([*common, "--set", "model.text_encoder=wordllama"]), prior[0],
                           None).cfg.model.text_encoder == "wordllama"


@pytest.mark.parametrize("case", ["split", "range", "ablation", "backbone", "local", "job_storage", "job_store"])
def test_bad_sweep_gives_one_line_before_anything_starts(case, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    workdir = tmp_path / "job_working_dir"
    workdir.mkdir()
    if case.startswith("job_"):  # the driver of a `ray job submit` job, in Ray's copy of the working dir
        monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}")
        monkeypatch.chdir(workdir)
    if case == "job_store":
        monkeypatch.delenv("MLFLOW_TRACKING_URI")  # the default ./mlflow.db would be in the working dir
    argv, fragment = {
        "split": (["--splits", "1,6"], "unknown split 6 in --splits '1,6'; MP-100 has splits 1-5"),
        "range": (["--splits", "3-1"], "runs backwards"),
        "ablation": (["--ablations", "full,nope"], "unknown ablation 'nope' in --ablations; available: ["),
        "backbone": (["--backbones", "resnet9000"], "unknown backbone 'resnet9000' in --backbones"),
        "local": (["--local"], "--local"),
        "job_storage": (["--storage-path", "runs"], "--storage-path {}/runs is inside the Ray job's working "
                                                    "directory".format(workdir)),
        "job_store": ([], f"the MLflow store {workdir}/mlflow.db is inside the Ray job's working directory"),
    }[case]
    with pytest.raises(SystemExit) as exc:
        run_main(sweep.main, ["--shards", str(tmp_path), "--embeddings", str(tmp_path), "--backbones", "tiny",
                              "--clip-checkpoint", "random", "--storage-path", str(tmp_path / "runs"), *argv])
    err = capsys.readouterr().err
    assert exc.value.code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0], err
    assert not list(tmp_path.rglob("mlflow.db")) and not list(tmp_path.rglob("runs"))
