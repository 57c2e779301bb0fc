"""Training for real: Ray Train (local mode and DDP workers), checkpoints and resume, MLflow on SQLite.

One set of shards and tiny-CLIP embeddings is made per session (``prepared``). Runs are tiny (tiny
backbone, few steps) but go through the real TorchTrainer, the real checkpoint storage and a real
MLflow SQLite store.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from capenext.checkpoint import read_checkpoint
from capenext.cli import run_main
from jobs import train
from capenext.checkpoint import latest_checkpoint
from tests.conftest import REPO, assert_one_line_error, in_process, run_cli

TINY = ["--backbone", "tiny", "--clip-model", "tiny", "--clip-checkpoint", "random", "--batch-size", "8",
        "--val-episodes", "2", "--episodes", "2", "--queries", "4", "--set", "model.dropout=0.0"]


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """A fresh cwd with its own MLflow SQLite store."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    return tmp_path


def _args(prepared: Path, *extra: str) -> list[str]:
    return ["--split", "1", "--shards", str(prepared / "shards"), "--embeddings", str(prepared / "emb"),
            *TINY, *extra]


def _run(argv: list[str], capsys) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exc:
        run_main(train.main, argv)
    out = capsys.readouterr()
    return exc.value.code, out.out, out.err


def _history(client: MlflowClient, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def _run_by_name(client: MlflowClient, name: str):
    exp = client.get_experiment_by_name("capenext")
    (run,) = client.search_runs([exp.experiment_id], f"tags.`capenext.run_name` = '{name}'")
    return run


@pytest.fixture(scope="session")
def local_run(prepared, tmp_path_factory):
    """One uninterrupted local-mode run of 3 epochs (a reference for the resume test), registered at the end
    as the MLflow model ``tiny-reg@champion``."""
    wd = tmp_path_factory.mktemp("local_run")
    env = {"MLFLOW_TRACKING_URI": f"sqlite:///{wd / 'mlflow.db'}"}
    proc = run_cli("jobs.train", *_args(prepared, "--local", "--epochs", "3", "--max-steps", "4",
                                        "--run-name", "ref", "--storage-path", str(wd / "runs"),
                                        "--register", "tiny-reg", "--register-alias", "champion"),
                   cwd=wd, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return wd, proc


def test_local_mode_trains_end_to_end_and_records_in_mlflow(local_run):
    wd, proc = local_run
    result = next(r for r in map(json.loads, proc.stdout.strip().splitlines()[-2:]) if "run_name" in r)
    assert {f"test/pck_{t:g}" for t in (0.05, 0.1, 0.15, 0.2, 0.25)} <= set(result)
    assert 0.0 <= result["test/pck_0.2"] <= 1.0
    client = MlflowClient(f"sqlite:///{wd / 'mlflow.db'}")
    run = _run_by_name(client, "ref")
    assert run.info.status == "FINISHED"
    assert run.data.tags["split"] == "1" and run.data.tags["ablation"] == "full"
    assert run.data.tags["backbone"] == "tiny"
    assert run.data.params["model.clip_model"] == "tiny" and run.data.params["optim.epochs"] == "3"
    losses = _history(client, run.info.run_id, "train/loss")
    assert [s for s, _ in losses] == [0, 1, 2]
    for term in ("train/heatmap", "train/proposal", "train/offset_layer0", "val/pck_0.2", "test/pck_mean"):
        assert _history(client, run.info.run_id, term), term
    arts = {a.path for a in client.list_artifacts(run.info.run_id, "checkpoints")}
    assert arts == {"checkpoints/final.pt", "checkpoints/best.pt"}
    local = client.download_artifacts(run.info.run_id, "checkpoints/final.pt", str(wd))
    ckpt = read_checkpoint(local)
    assert ckpt["run_config"].model.ablation == "full"
    assert not any(k.startswith("clip.") for k in ckpt["model"])


def test_killed_run_resumes_in_the_same_mlflow_run_with_equal_losses(prepared, local_run, capsys, monkeypatch):
    """SIGKILL the driver (a real process) after its second checkpoint, re-run (through the entry, in this
    process): same run id, epochs continue, and the losses after resuming equal those of the uninterrupted run
    (CPU, deterministic)."""
    wd, _ = local_run
    runs = wd / "runs"
    argv = [sys.executable, "-m", "jobs.train",
            *_args(prepared, "--local", "--epochs", "3", "--max-steps", "4", "--run-name", "killed",
                   "--storage-path", str(runs))]
    env = {**os.environ, "PYTHONPATH": str(REPO), "MLFLOW_TRACKING_URI": f"sqlite:///{wd / 'mlflow.db'}"}
    proc = subprocess.Popen(argv, cwd=wd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    target = runs / "killed" / "local" / "checkpoint_000001" / "state.pt"
    while not target.is_file() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert target.is_file(), "the run never wrote its second checkpoint"

    client = MlflowClient(f"sqlite:///{wd / 'mlflow.db'}")
    before = _run_by_name(client, "killed")
    assert before.info.status == "RUNNING"
    monkeypatch.chdir(wd)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", env["MLFLOW_TRACKING_URI"])
    code, out, err = _run(argv[3:], capsys)  # python -m jobs.train ...
    assert code == 0, err[-3000:]
    assert "resuming killed" in out
    after = _run_by_name(client, "killed")
    assert after.info.run_id == before.info.run_id and after.info.status == "FINISHED"
    resumed = _history(client, after.info.run_id, "train/loss")
    reference = _history(client, _run_by_name(client, "ref").info.run_id, "train/loss")
    assert [s for s, _ in resumed] == [0, 1, 2]
    assert [v for _, v in resumed] == pytest.approx([v for _, v in reference], rel=1e-5, abs=1e-7)


def test_two_ddp_workers_match_one_process(prepared, ray_local, workdir, capsys):
    """gloo DDP with 2 Ray Train workers x batch 4 follows the same loss curve as one process x batch 8 (the
    same loop in local mode). A Ray Train run resumed when submitted again: the sweep's stopped trial
    (tests/test_sweep.py); resumed after its worker was killed: the killed-worker test below."""
    curves = {}
    client = MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
    for workers in (1, 2):
        how = ["--num-workers", str(workers)] if workers > 1 else ["--local"]
        code, _, err = _run(_args(prepared, "--epochs", "2", "--max-steps", "3", *how, "--run-name", f"w{workers}",
                                  "--storage-path", "runs", "--val-every", "2"), capsys)
        assert code == 0, err[-3000:]
        curves[workers] = _history(client, _run_by_name(client, f"w{workers}").info.run_id, "train/loss")
    assert len(curves[1]) == 2
    assert [s for s, _ in curves[2]] == [s for s, _ in curves[1]]
    assert [v for _, v in curves[2]] == pytest.approx([v for _, v in curves[1]], rel=2e-4)


def test_a_checkpoint_folder_cut_short_is_not_resumed_from(tmp_path):
    """A worker killed while Ray copies its checkpoint leaves a folder with a truncated file: resuming
    takes the newest complete folder instead."""
    from capenext.cli import UsageError
    from capenext.checkpoint import CHECKPOINT_FILE, STATE_FILE, check_resumable, write_progress

    for epoch, name in enumerate(["checkpoint_a", "checkpoint_b"]):
        folder = tmp_path / "run" / name
        folder.mkdir(parents=True)
        torch.save({"step": epoch, "pad": torch.zeros(1000)}, folder / STATE_FILE)
        torch.save({"weights": torch.zeros(1000)}, folder / CHECKPOINT_FILE)
        write_progress(folder, {"epoch": epoch, "step": 10 * (epoch + 1), "best": 0.0, "run_id": "r"})
    assert latest_checkpoint(tmp_path, "run", complete_only=True).name == "checkpoint_b"
    # a copy cut off before progress.json arrived: a truncated state and no recorded sizes
    torn = tmp_path / "run" / "checkpoint_c"
    torn.mkdir()
    (torn / STATE_FILE).write_bytes((tmp_path / "run" / "checkpoint_b" / STATE_FILE).read_bytes()[:500])
    assert latest_checkpoint(tmp_path, "run", complete_only=True).name == "checkpoint_b"
    newest = latest_checkpoint(tmp_path, "run")  # the driver sees it, and refuses it in one line
    assert newest.name == "checkpoint_c"
    with pytest.raises(UsageError, match=r"checkpoint_c is cut short \(progress\.json is missing\)"):
        check_resumable(newest)
    before = (tmp_path / "run" / "checkpoint_a").stat().st_mtime - 10
    os.utime(torn, (before, before))  # cut short before the restarted worker wrote checkpoint_b
    assert latest_checkpoint(tmp_path, "run").name == "checkpoint_b"
    shutil.rmtree(torn)
    state = tmp_path / "run" / "checkpoint_b" / STATE_FILE
    state.write_bytes(state.read_bytes()[:500])
    assert latest_checkpoint(tmp_path, "run", complete_only=True).name == "checkpoint_a"
    assert latest_checkpoint(tmp_path, "run").name == "checkpoint_b"  # the driver's checks see it, and say so
    (tmp_path / "run" / "checkpoint_a" / "progress.json").write_text('{"epoch": 0, "st')
    assert latest_checkpoint(tmp_path, "run", complete_only=True) is None


@pytest.mark.parametrize("case", ["split", "ablation", "backbone", "shards", "embeddings", "clip", "no_clip",
                                  "quick_gelu", "image_norm", "bbox_scale", "image_size"])
def test_bad_input_gives_one_line_before_any_worker(prepared, workdir, capsys, tmp_path, case):
    args = _args(prepared, "--local", "--run-name", "bad", "--storage-path", "runs")
    fragments = {
        "split": (["--split", "7"], "unknown split 7"),
        "ablation": (["--ablation", "no_such"], "unknown ablation 'no_such'"),
        "backbone": (["--backbone", "resnet9000"], "unknown backbone 'resnet9000'"),
        "shards": (["--shards", str(tmp_path / "nowhere")], "nowhere"),
        "embeddings": (["--embeddings", str(tmp_path / "nowhere")], "no embeddings in"),
        "clip": (["--clip-model", "ViT-B-32"], "clip_model='tiny'"),
        "no_clip": (["--set", "model.clip_checkpoint=none"], "--clip-checkpoint"),
        # tables made with other settings than the run's: refused, naming the field and both values
        "quick_gelu": (["--set", "model.clip_quick_gelu=false"], "clip_quick_gelu=True, this run uses False"),
        "image_norm": (["--set", "model.clip_image_norm=imagenet"], "clip_image_norm='clip', this run uses 'imagenet'"),
        "bbox_scale": (["--set", "data.bbox_scale=1.6"], "bbox_scale=1.25, this run uses 1.6"),
        "image_size": (["--set", "data.image_size=256"], "image_size=128, this run uses 256"),
    }[case]
    code, out, err = _run(args + fragments[0], capsys)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and fragments[1] in lines[0], err
    assert not (workdir / "runs" / "bad").exists()


def test_augmentation_of_a_pair_index_changes_per_epoch_and_repeats(prepared, monkeypatch):
    from capenext.config import load_preset
    from capenext.data.shards import ShardIndex
    from jobs.training import loop as train_loop

    index = ShardIndex(prepared / "shards")
    subset = index.subset(1, "train")
    cfg = load_preset("tiny").data
    # the same pairs in every epoch, so that only the augmentation's seed can differ
    from capenext.data import training_pairs

    pairs0 = training_pairs(subset.by_category(), 0, 0)
    monkeypatch.setattr("capenext.data.training_pairs", lambda by_cat, seed, epoch: pairs0)

    def item(epoch: int):
        ds = train_loop.epoch_dataset(subset, cfg, 0, epoch, 0, 1, index.load_image)
        return ds[0]

    first, again, later = item(0), item(0), item(1)
    assert torch.equal(first["img"], again["img"]) and torch.equal(first["heatmap"], again["heatmap"])
    assert not torch.equal(first["img"], later["img"])  # epoch 1 draws another augmentation
    assert torch.equal(item(1)["img"], later["img"])  # and draws it again the same way (a repeated run)


def test_checkpoint_of_another_config_is_refused(prepared, local_run, capsys, monkeypatch):
    wd, _ = local_run
    monkeypatch.chdir(wd)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{wd / 'mlflow.db'}")
    proc = in_process(train.main, _args(prepared, "--local", "--ablation", "baseline", "--run-name", "ref",
                                        "--storage-path", str(wd / "runs")), capsys, monkeypatch)
    assert_one_line_error(proc, "run 'ref' has a checkpoint of another config", "model.ablation")


def _train_workers() -> list:
    """The live Ray Train worker processes of this process's Ray instance (its raylet is a child of this
    process): never those of another test's Ray, such as the sweep's trials on cluster/local.sh's head."""
    import psutil

    found = []
    for p in psutil.Process().children(recursive=True):
        try:
            if any("RayTrainWorker" in part for part in p.cmdline()):
                found.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return found


def test_killed_train_worker_resumes_and_logs_each_epoch_once(prepared, ray_local, workdir, capsys):
    """SIGKILL of the Ray Train worker just after its first report, then again mid-epoch: Ray restarts the
    worker group (--max-failures 2), the run resumes from its checkpoint each time, and the finished run's
    MLflow history holds every epoch exactly once."""
    import threading

    runs = workdir / "runs"
    kills: list[str] = []

    def reported(n: int) -> bool:  # Ray Train names its checkpoint folders by time
        return len(list((runs / "restart").glob("checkpoint_*/state.pt"))) >= n

    def killer():
        deadline = time.time() + 400
        while not reported(1) and time.time() < deadline:
            time.sleep(0.05)
        for p in _train_workers():  # just after the first report
            p.kill()
            kills.append("after report")
        while not reported(2) and time.time() < deadline:
            time.sleep(0.05)
        time.sleep(1.0)  # into the last epoch's steps (20 of about 0.1 s each)
        for p in _train_workers():
            p.kill()
            kills.append("mid-epoch")

    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    code, out, err = _run(_args(prepared, "--epochs", "3", "--max-steps", "20", "--run-name", "restart",
                                "--storage-path", "runs", "--max-failures", "2", "--val-every", "3"), capsys)
    thread.join(timeout=30)
    assert code == 0, err[-3000:]
    assert kills == ["after report", "mid-epoch"], kills
    client = MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
    run = _run_by_name(client, "restart")
    assert run.info.status == "FINISHED"
    assert [s for s, _ in _history(client, run.info.run_id, "train/loss")] == [0, 1, 2]
    assert "test/pck_mean" in run.data.metrics and "floor/pck_mean" in run.data.metrics
    # the optimiser's step count went on from each checkpoint: 3 epochs x 20 steps in all
    assert torch.load(latest_checkpoint(runs, "restart") / "state.pt", weights_only=True)["step"] == 3 * 20


def test_missing_backbone_weights_through_ray_fail_in_preflight_with_no_run(prepared, ray_local, workdir, capsys):
    code, out, err = _run(_args(prepared, "--backbone-checkpoint", str(workdir / "swin.safetensors"),
                                "--run-name", "nofile", "--storage-path", "runs"), capsys)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1, err[-2000:]
    assert "--backbone-checkpoint" in lines[0] and "swin.safetensors: no such file" in lines[0]
    client = MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
    exp = client.get_experiment_by_name("capenext")
    assert exp is None or not client.search_runs([exp.experiment_id], "tags.`capenext.run_name` = 'nofile'")


def test_a_local_run_stopped_with_sigterm_is_recorded_killed(prepared, workdir):
    """``kill`` (SIGTERM) on ``jobs.train --local`` after its first checkpoint: the process stops with the one
    line ``interrupted`` and its MLflow run is KILLED, not left RUNNING."""
    argv = [sys.executable, "-m", "jobs.train", *_args(prepared, "--local", "--epochs", "20", "--max-steps", "2",
                                                       "--run-name", "term", "--storage-path", "runs")]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(argv, cwd=workdir, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    target = workdir / "runs" / "term" / "local" / "checkpoint_000000" / "progress.json"
    deadline = time.time() + 240
    while not target.is_file() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    assert target.is_file(), "the run never wrote its first checkpoint"
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and err.strip().splitlines()[-1] == "error: interrupted", err[-2000:]
    client = MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
    assert _run_by_name(client, "term").info.status == "KILLED"


def test_a_run_that_fails_in_its_worker_ends_failed_not_running(prepared, workdir, capsys):
    code, out, err = _run(_args(prepared, "--local", "--epochs", "1", "--max-steps", "2", "--run-name", "nan",
                                "--storage-path", "runs", "--max-failures", "0", "--set", "optim.lr=nan"), capsys)
    assert code != 0
    client = MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
    assert _run_by_name(client, "nan").info.status == "FAILED"


def test_register_makes_the_final_checkpoint_a_registered_model(local_run, tmp_path):
    from jobs.runtime.checkpoints import resolve_checkpoint

    wd, proc = local_run
    record = json.loads(proc.stdout.strip().splitlines()[-1])
    assert record["name"] == "tiny-reg" and record["alias"] == "champion" and record["version"] == 1
    source = resolve_checkpoint("models:/tiny-reg@champion", f"sqlite:///{wd / 'mlflow.db'}", tmp_path)
    got = read_checkpoint(source.path)["model"]
    want = read_checkpoint(wd / "runs" / "ref" / "artifacts" / "final.pt")["model"]
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
