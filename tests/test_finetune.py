"""Fine-tuning: ``jobs.train --init-checkpoint`` starts from a checkpoint's weights (fresh optimiser and
schedule), ``--freeze`` keeps parts fixed, the source is recorded in MLflow, a tensor that does not fit
is one line before any worker starts, and a run with a checkpoint of its own resumes instead.

All runs are local mode on the session's shards (tiny settings, a few steps), in one MLflow store.
"""

from __future__ import annotations

import re

import pytest
import torch
from mlflow.tracking import MlflowClient

from capenext.checkpoint import read_checkpoint
from capenext.cli import UsageError, run_main
from capenext.files import file_sha256
from jobs import train
from capenext.checkpoint import STATE_FILE, latest_checkpoint

TINY = ["--backbone", "tiny", "--clip-model", "tiny", "--clip-checkpoint", "random", "--batch-size", "8",
        "--val-episodes", "1", "--episodes", "1", "--queries", "4", "--set", "model.dropout=0.0",
        "--local"]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A working folder with its own MLflow store, shared by the module's runs."""
    wd = tmp_path_factory.mktemp("finetune")
    mp = pytest.MonkeyPatch()
    mp.chdir(wd)
    mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{wd / 'mlflow.db'}")
    yield wd
    mp.undo()


def _train(prepared, name: str, *extra: str, capsys=None) -> str:
    """One local run; its stdout when ``capsys`` is given."""
    argv = ["--split", "1", "--shards", str(prepared / "shards"), "--embeddings", str(prepared / "emb"), *TINY,
            "--run-name", name, *extra]
    with pytest.raises(SystemExit) as exc:
        run_main(train.main, argv)
    out = capsys.readouterr() if capsys is not None else None
    assert exc.value.code == 0, out.err[-3000:] if out else ""
    return out.out if out else ""


def _run(name: str):
    client = MlflowClient()
    exp = client.get_experiment_by_name("capenext")
    (run,) = client.search_runs([exp.experiment_id], f"tags.`capenext.run_name` = '{name}'")
    return client, run


def _first_loss(name: str) -> float:
    client, run = _run(name)
    return min(client.get_metric_history(run.info.run_id, "train/loss"), key=lambda m: m.step).value


@pytest.fixture(scope="module")
def base(prepared, store):
    """A model trained 3 epochs from scratch: the checkpoint every fine-tuning run starts from."""
    _train(prepared, "base", "--epochs", "3", "--max-steps", "6")
    return store / "runs" / "base" / "artifacts" / "final.pt"


def test_fine_tuning_starts_at_the_checkpoints_loss_and_records_its_source(prepared, base, capsys):
    client, base_run = _run("base")
    scratch_out = _train(prepared, "scratch", "--epochs", "1", "--max-steps", "4", capsys=capsys)
    out = _train(prepared, "tuned", "--epochs", "1", "--max-steps", "4", "--init-checkpoint",
                 base_run.info.run_id, capsys=capsys)
    assert "starting tuned from the weights of " + base_run.info.run_id in out
    assert "resum" not in scratch_out + out
    last_base = max(client.get_metric_history(base_run.info.run_id, "train/loss"), key=lambda m: m.step).value
    tuned, scratch = _first_loss("tuned"), _first_loss("scratch")
    assert tuned < scratch  # same data, same seed: only the starting weights differ
    assert abs(tuned - last_base) < abs(scratch - last_base)
    _, run = _run("tuned")
    assert run.data.params["init_checkpoint"] == base_run.info.run_id
    assert run.data.tags["init_checkpoint"] == base_run.info.run_id
    assert run.data.tags["init_run_id"] == base_run.info.run_id
    assert run.data.tags["init_checkpoint_sha256"] == file_sha256(base)
    assert "init_checkpoint" not in _run("scratch")[1].data.tags


def test_warmup_longer_than_the_run_is_shortened_and_a_rerun_resumes_ignoring_the_init(prepared, base, capsys):
    extra = ["--epochs", "1", "--max-steps", "3", "--init-checkpoint", str(base)]
    out = _train(prepared, "short", *extra, capsys=capsys)
    assert "warm-up of 30 steps is longer than the whole run (1 epoch of 3 steps); optim.warmup_iters shortened " \
        "to 1" in out
    _, run = _run("short")
    assert run.data.params["optim.warmup_iters"] == "1"
    assert run.data.params["init_checkpoint"] == str(base)
    again = _train(prepared, "short", *extra, capsys=capsys)  # the same command: a checkpoint of its own now
    assert "resumes from a checkpoint of its own; --init-checkpoint" in again and "is ignored" in again
    assert "starting short from the weights" not in again
    assert _run("short")[1].info.run_id == run.info.run_id


def test_freeze_backbone_keeps_its_weights_and_leaves_it_out_of_the_optimiser(prepared, base, store, capsys):
    _train(prepared, "frozen", "--epochs", "1", "--max-steps", "3", "--init-checkpoint", str(base),
           "--freeze", "backbone", capsys=capsys)
    before = read_checkpoint(base)["model"]
    after = read_checkpoint(store / "runs" / "frozen" / "artifacts" / "final.pt")["model"]
    backbone = [k for k in before if k.startswith("backbone.")]
    assert backbone and all(torch.equal(before[k], after[k]) for k in backbone)
    assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith("decoder."))
    state = torch.load(latest_checkpoint(store / "runs", "frozen") / STATE_FILE, weights_only=True)
    optimised = sum(len(g["params"]) for g in state["optimizer"]["param_groups"])
    from capenext.models import build_model

    model = build_model(read_checkpoint(base)["run_config"].model)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad and not n.startswith("backbone.")]
    assert optimised == len(trainable)
    assert _run("frozen")[1].data.params["job.freeze"] == "backbone"


@pytest.mark.parametrize("case", ["shape", "freeze"])
def test_bad_fine_tuning_input_is_one_line_before_any_run(prepared, base, capsys, case):
    extra = {"shape": ["--set", "model.dim=32", "--init-checkpoint", str(base)],
             "freeze": ["--freeze", "decoder", "--init-checkpoint", str(base)]}[case]
    args = train.parse_args(["--split", "1", "--shards", str(prepared / "shards"), "--embeddings",
                             str(prepared / "emb"), *TINY, "--epochs", "1", "--run-name", f"bad-{case}", *extra])
    with pytest.raises(UsageError) as exc:
        train.run(args)
    message = str(exc.value)
    assert "\n" not in message
    if case == "shape":
        assert message.startswith(f"--init-checkpoint {base}: ") and "tensor(s) do not fit" in message
        assert re.search(r"[\w.]+ is \(64, [\d, ]*\) there, \(32, [\d, ]*\) here", message), message
    else:
        assert "--freeze 'decoder'" in message and "backbone,encoder" in message
    client = MlflowClient()
    exp = client.get_experiment_by_name("capenext")
    assert not client.search_runs([exp.experiment_id], f"tags.`capenext.run_name` = 'bad-{case}'")
