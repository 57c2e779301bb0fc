"""jobs.evaluate: the training run's test protocol reproduced, noisy prompts, MLflow evaluation runs.

A tiny CapeNext is trained once per test run (:func:`trained_run`, shared with ``test_predict.py`` and
``test_serve.py`` through :func:`tests.conftest.shared`) on the synthetic set's split 1, in Ray Train's local mode, with
its own MLflow SQLite store; the evaluation job then reads that store like a user's.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient
from PIL import Image

from capenext.cli import run_main
from capenext.config import THRESHOLDS
from capenext.noise import load_template_maps
from jobs import evaluate
from tests.conftest import assert_one_line_error, run_cli, shared

# the tiny model of tests/test_train.py, trained a little longer so that it beats the baseline clearly
TRAIN_ARGS = ["--split", "1", "--backbone", "tiny", "--clip-model", "tiny", "--clip-checkpoint", "random",
              "--batch-size", "8", "--epochs", "10", "--max-steps", "40", "--val-every", "10", "--val-episodes", "2",
              "--episodes", "3", "--queries", "5", "--set", "model.dropout=0.0", "--local",
              "--run-name", "tiny-full", "--experiment", "capenext-tests"]
PCK_KEYS = [f"test/pck_{t:g}" for t in THRESHOLDS] + ["test/pck_mean"]


def trained_run(tmp_path_factory, prepared: Path) -> dict:
    """Shards, tiny random-CLIP embeddings and one trained run, made once per test run (:func:`shared`).

    Returns ``{"base", "shards", "emb", "uri", "run_id", "experiment_id", "checkpoint", "metrics"}``.
    """
    return shared(tmp_path_factory, "trained", lambda base: _train(base, prepared))


def _train(base: Path, prepared: Path) -> dict:
    from jobs import train

    shards, emb = prepared / "shards", prepared / "emb"
    uri = f"sqlite:///{base / 'mlflow.db'}"
    old_env, old_threads = os.environ.get("MLFLOW_TRACKING_URI"), torch.get_num_threads()
    os.environ["MLFLOW_TRACKING_URI"] = uri
    try:
        args = train.parse_args([*TRAIN_ARGS, "--shards", str(shards), "--embeddings", str(emb),
                                 "--storage-path", str(base / "runs")])
        metrics = train.run(args)
    finally:  # the local loop sets threads and deterministic mode for this process: put them back
        torch.set_num_threads(old_threads)
        torch.use_deterministic_algorithms(False)
        if old_env is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = old_env
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("capenext-tests")
    (run,) = client.search_runs([exp.experiment_id], "tags.`capenext.run_name` = 'tiny-full'")
    return {"base": str(base), "shards": str(shards), "emb": str(emb), "uri": uri,
            "run_id": run.info.run_id, "experiment_id": exp.experiment_id,
            "checkpoint": str(base / "runs" / "tiny-full" / "artifacts" / "final.pt"), "metrics": metrics}


@pytest.fixture(scope="module")
def trained(tmp_path_factory, prepared) -> dict:
    return trained_run(tmp_path_factory, prepared)


@pytest.fixture
def store(trained, monkeypatch, tmp_path) -> MlflowClient:
    """A private copy of the trained run's MLflow store as the default one (each test sees only its own
    evaluation runs); a fresh cwd."""
    db = tmp_path / "mlflow.db"
    shutil.copyfile(Path(trained["base"]) / "mlflow.db", db)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{db}")
    monkeypatch.chdir(tmp_path)
    return MlflowClient(f"sqlite:///{db}")


def _evaluate(capsys, *argv: str) -> tuple[int, dict | None, str]:
    with pytest.raises(SystemExit) as exc:
        run_main(evaluate.main, list(argv))
    out = capsys.readouterr()
    lines = out.out.strip().splitlines()
    result = json.loads(lines[-1]) if exc.value.code == 0 else None
    return exc.value.code, result, out.err


def _data(trained: dict, tables: bool = True) -> list[str]:
    return ["--shards", trained["shards"], *(["--embeddings", trained["emb"]] if tables else []), "--quiet"]


def _pck(row: dict) -> list[float]:
    return [row[k] for k in PCK_KEYS]


def _evaluation_runs(client: MlflowClient, trained: dict, noise: str | None = None) -> list:
    query = f"tags.`capenext.kind` = 'evaluation' and tags.training_run_id = '{trained['run_id']}'"
    if noise:
        query += f" and tags.noise = '{noise}'"
    return client.search_runs([trained["experiment_id"]], query)


def test_trained_model_beats_the_mean_position_baseline(trained):
    """The shared fixture is a real model: its logged test PCK@0.2 is clearly above the floor."""
    m = trained["metrics"]
    assert m["test/pck_0.2"] > m["floor/pck_0.2"] + 0.05, m


def test_noise_none_reproduces_the_training_runs_test_pck_and_links_the_run(trained, store, capsys, tmp_path):
    code, result, err = _evaluate(capsys, "--checkpoint", f"runs:/{trained['run_id']}/checkpoints/final.pt",
                                  *_data(trained), "--pictures", "1", "--out", str(tmp_path / "pics"))
    assert code == 0, err
    (row,) = result["rows"]
    assert result["split"] == 1 and result["training_run_id"] == trained["run_id"]
    logged = store.get_run(trained["run_id"]).data.metrics
    assert _pck(row) == [logged[k] for k in PCK_KEYS]  # exactly: same episodes, crops, batches, embeddings
    assert row["test/queries"] == logged["test/queries"]

    (run,) = _evaluation_runs(store, trained)
    assert run.info.run_id == row["run_id"] and run.info.status == "FINISHED"
    assert run.info.experiment_id == trained["experiment_id"]
    tags = run.data.tags
    assert {k: tags[k] for k in ("capenext.kind", "training_run_id", "noise", "noise_variant", "split", "ablation",
                                 "backbone")} == {
        "capenext.kind": "evaluation", "training_run_id": trained["run_id"], "noise": "none",
        "noise_variant": "clean", "split": "1", "ablation": "full", "backbone": "tiny"}
    assert [run.data.metrics[k] for k in PCK_KEYS] == _pck(row)
    (art,) = store.list_artifacts(run.info.run_id, "pictures")
    assert art.path == "pictures/clean.png"
    with Image.open(row["picture"]) as im:  # one row per test category, 1 best + 1 worst each
        assert im.format == "PNG" and im.width > 200 and im.height > 4 * 150


def test_bare_run_id_and_local_file_give_the_same_numbers(trained, store, capsys):
    code, by_id, err = _evaluate(capsys, "--checkpoint", trained["run_id"], *_data(trained), "--pictures", "0",
                                 "--no-mlflow")
    assert code == 0, err
    code, by_file, err = _evaluate(capsys, "--checkpoint", trained["checkpoint"], *_data(trained), "--pictures", "0",
                                   "--no-mlflow")
    assert code == 0, err
    assert by_file["split"] == 1  # from the training run's tag, found through the checkpoint's run id
    assert _pck(by_id["rows"][0]) == _pck(by_file["rows"][0]) == [trained["metrics"][k] for k in PCK_KEYS]
    assert _evaluation_runs(store, trained) == []  # --no-mlflow logs nothing


def test_noise_is_deterministic_for_a_seed_and_changes_results(trained, store, capsys):
    """Typos at 0.3 (a rate the tables do not hold: encoded in-process) and wrong class prompts."""
    rows = {}
    for name, extra in {"typo-s0": ["--noise", "typo", "--typo-rate", "0.3", "--noise-seed", "0"],
                        "typo-s0-again": ["--noise", "typo", "--typo-rate", "0.3", "--noise-seed", "0"],
                        "typo-s1": ["--noise", "typo", "--typo-rate", "0.3", "--noise-seed", "1"],
                        "class": ["--noise", "class", "--noise-seed", "0"]}.items():
        code, result, err = _evaluate(capsys, "--checkpoint", trained["checkpoint"], *_data(trained),
                                      "--pictures", "0", *extra)
        assert code == 0, err
        (rows[name],) = result["rows"]
    clean = [trained["metrics"][k] for k in PCK_KEYS]
    assert rows["typo-s0"]["noise_variant"] == "typo@0.3" and rows["typo-s0"]["embeddings"] == "in-process"
    assert _pck(rows["typo-s0"]) == _pck(rows["typo-s0-again"])
    assert _pck(rows["typo-s0"]) != _pck(rows["typo-s1"])
    assert _pck(rows["typo-s0"]) != clean and _pck(rows["class"]) != clean
    assert rows["typo-s0"]["noise/changed_fraction"] > 0.5 and rows["class"]["noise/changed_fraction"] == 1.0
    logged = {r.data.tags["noise_variant"] for r in _evaluation_runs(store, trained)}
    assert logged == {"typo@0.3", "class"}


def test_tables_and_in_process_encoding_agree(trained, store, capsys):
    """typo@0.1 with seed 0 is precomputed by pipelines.embed; without --embeddings everything (keypoint
    texts, class prompts, image embeddings of the crops) is encoded here: same results."""
    results = []
    for tables in (True, False):
        code, result, err = _evaluate(capsys, "--checkpoint", trained["checkpoint"], *_data(trained, tables),
                                      "--noise", "typo", "--pictures", "0", "--no-mlflow")
        assert code == 0, err
        results.append(result["rows"][0])
    assert results[0]["embeddings"] == "tables" and results[1]["embeddings"].startswith("in-process")
    assert _pck(results[0]) == pytest.approx(_pck(results[1]), abs=1e-9)


def test_template_noise_gives_one_row_per_table5_map_and_a_custom_map(trained, store, capsys, tmp_path):
    code, result, err = _evaluate(capsys, "--checkpoint", trained["checkpoint"], *_data(trained), "--noise",
                                  "template", "--pictures", "0")
    assert code == 0, err
    names = [r["noise_variant"] for r in result["rows"]]
    assert names == [f"template:{n}" for n in load_template_maps()]
    assert {r["embeddings"] for r in result["rows"]} == {"tables"}
    runs = _evaluation_runs(store, trained, noise="template")
    assert sorted(r.data.tags["noise_variant"] for r in runs) == sorted(names)
    # a map that touches no test keypoint leaves the clean result; one that does (eye → eyeball) may not
    by_name = {r["noise_variant"]: r for r in result["rows"]}
    for r in result["rows"]:
        if r["noise/changed_fraction"] == 0:
            assert _pck(r) == [trained["metrics"][k] for k in PCK_KEYS]
    assert by_name["template:eye-eyeball"]["noise/changed_fraction"] > 0

    (tmp_path / "mine.json").write_text(json.dumps({"eye": "eyeball"}))
    code, custom, err = _evaluate(capsys, "--checkpoint", trained["checkpoint"], *_data(trained), "--noise",
                                  "template", "--template-map", str(tmp_path / "mine.json"), "--pictures", "0",
                                  "--no-mlflow")
    assert code == 0, err
    (row,) = custom["rows"]
    assert row["noise_variant"] == "template:mine" and row["embeddings"] == "in-process"
    assert _pck(row) == pytest.approx(_pck(by_name["template:eye-eyeball"]), abs=1e-9)


@pytest.mark.parametrize("case", ["rate_without_typo", "missing_file", "unknown_run", "no_split", "bad_rate"])
def test_bad_input_gives_one_line(trained, store, capsys, tmp_path, case):
    foreign = tmp_path / "foreign.pt"
    if case == "no_split":  # a checkpoint whose training run this store does not know
        ckpt = torch.load(trained["checkpoint"], weights_only=True)
        ckpt["meta"]["run_id"] = "0" * 32
        torch.save(ckpt, foreign)
    argv, fragment = {
        "rate_without_typo": (["--checkpoint", trained["checkpoint"], "--noise", "class", "--typo-rate", "0.2"],
                              "--typo-rate applies to --noise typo"),
        "missing_file": (["--checkpoint", str(tmp_path / "none.pt")], "checkpoint not found"),
        "unknown_run": (["--checkpoint", "f" * 32], "cannot fetch checkpoint runs:/ffff"),
        "no_split": (["--checkpoint", str(foreign)], "pass --split K"),
        "bad_rate": (["--checkpoint", trained["checkpoint"], "--noise", "typo", "--typo-rate", "2"],
                     "--typo-rate must lie in [0, 1]"),
    }[case]
    code, _, err = _evaluate(capsys, *argv, *_data(trained), "--pictures", "0")
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0], err
    assert _evaluation_runs(store, trained) == []


def test_a_job_that_fails_on_its_input_leaves_no_store_behind(tmp_path, monkeypatch):
    """As a user runs it (``jobs.evaluate``'s one real process in the suite): one line, and no default store
    made in the working directory."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)  # the default store: ./mlflow.db
    proc = run_cli("jobs.evaluate", "--checkpoint", "none.pt", "--shards", "shards", "--split", "1", cwd=tmp_path)
    assert_one_line_error(proc, "checkpoint not found: none.pt")
    assert list(tmp_path.iterdir()) == []  # no mlflow.db (nor mlartifacts/) in the working directory
