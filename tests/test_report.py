"""jobs.report on a real MLflow store: runs logged with ``MlflowClient`` as the training and evaluation jobs
log them (tags split/ablation/backbone/seed, ``test/pck_*``, ``floor/pck_*``, per-epoch curves), then the tables' shapes and cells, the "—" and "mean ± std" cells, CSV, the published
numbers, noise variants, re-runs of a cell, the default backbone, and the PNG files."""

from __future__ import annotations

import ast
import csv
import math
import os
from pathlib import Path

import pytest
from mlflow.entities import Metric
from mlflow.tracking import MlflowClient

from capenext.cli import run_main
from jobs import report

THRESHOLDS = (0.05, 0.1, 0.15, 0.2, 0.25)


def _log_training(client: MlflowClient, exp: str, parent: str | None, split: int, ablation: str, seed: int,
                  pck: float, status: str = "FINISHED", backbone: str = "tiny", floor: float = 0.3,
                  end_time: int | None = None) -> str:
    """One training run as jobs.train logs it; PCK@t = pck + (t - 0.2), the mean-position floor a flat
    ``floor``."""
    name = f"rep-split{split}-{ablation}-{backbone}-seed{seed}"
    tags = {"split": str(split), "ablation": ablation, "backbone": backbone, "seed": str(seed),
            "capenext.run_name": name, "mlflow.runName": name}
    if parent:
        tags["mlflow.parentRunId"] = parent
    run_id = client.create_run(exp, run_name=name, tags=tags).info.run_id
    shift = 0.1 * report.ablation_order().index(ablation)  # curves that tell the ablations apart in the plot
    metrics = [Metric("train/loss", 3.0 - 0.5 * e - 0.1 * seed + shift, 0, e) for e in range(3)]
    metrics += [Metric("val/pck_0.2", 0.1 * (e + 1) + shift / 4, 0, e) for e in range(3)]
    if status == "FINISHED":
        values = {t: pck + (t - 0.2) for t in THRESHOLDS}
        metrics += [Metric(f"test/pck_{t:g}", v, 0, 3) for t, v in values.items()]
        metrics += [Metric("test/pck_mean", sum(values.values()) / 5, 0, 3)]
        metrics += [Metric(f"floor/pck_{t:g}", floor, 0, 3) for t in THRESHOLDS]
        metrics += [Metric("floor/pck_mean", floor, 0, 3)]
    client.log_batch(run_id, metrics=metrics)
    if status == "FINISHED":
        client.set_terminated(run_id, "FINISHED", end_time=end_time)
    return run_id


def _log_evaluation(client: MlflowClient, exp: str, training_run: str, noise: str, variant: str, pck: float) -> None:
    run_id = client.create_run(exp, tags={"capenext.kind": "evaluation", "noise": noise, "noise_variant": variant,
                                          "training_run_id": training_run}).info.run_id
    client.log_metric(run_id, "test/pck_0.2", pck)
    client.set_terminated(run_id, "FINISHED")


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """An experiment 'rep' with a sweep parent run and children:

    * full: splits 1-5, seeds 0 and 1 (PCK@0.2 = 0.50 + 0.01 k and 0.52 + 0.01 k);
    * baseline: splits 1-3, seed 0 (0.40); no_hcmi: split 1 (0.45); no_lw: splits 1-2 (0.47);
    * one RUNNING full run (split 1, seed 2): not finished, out of the tables;
    * one finished no_dsfr run that is not a child of the sweep;
    * evaluation runs: class noise on full and no_lw split 1; a typo and a template variant on full and baseline.
    """
    root = tmp_path_factory.mktemp("report_store")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    client = MlflowClient(uri)
    exp = client.create_experiment("rep", artifact_location=(root / "mlartifacts").as_uri())
    parent = client.create_run(exp, run_name="rep-sweep", tags={"capenext.sweep": "rep", "capenext.kind": "sweep"})
    pid = parent.info.run_id
    ids = {}
    for k in range(1, 6):
        for seed, base in ((0, 0.50), (1, 0.52)):
            ids[("full", k, seed)] = _log_training(client, exp, pid, k, "full", seed, base + 0.01 * k)
    for k in range(1, 4):
        ids[("baseline", k, 0)] = _log_training(client, exp, pid, k, "baseline", 0, 0.40)
    _log_training(client, exp, pid, 1, "no_hcmi", 0, 0.45)
    for k in (1, 2):
        ids[("no_lw", k, 0)] = _log_training(client, exp, pid, k, "no_lw", 0, 0.47)
    _log_training(client, exp, pid, 1, "full", 2, 0.99, status="RUNNING")
    _log_training(client, exp, None, 1, "no_dsfr", 0, 0.33)
    _log_evaluation(client, exp, ids[("full", 1, 0)], "class", "class", 0.49)
    _log_evaluation(client, exp, ids[("no_lw", 1, 0)], "class", "class", 0.44)
    for method, base in (("full", 0.30), ("baseline", 0.20)):
        _log_evaluation(client, exp, ids[(method, 1, 0)], "typo", "typo@0.1", base)
        _log_evaluation(client, exp, ids[(method, 1, 0)], "template", "template:paw-foreleg", base + 0.1)
        _log_evaluation(client, exp, ids[(method, 1, 0)], "reference", "reference:typo", base + 0.2)
    client.set_terminated(pid, "FINISHED")
    return uri, pid


def _read_csv(path) -> list[list[str]]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.reader(f))


def _run(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        run_main(report.main, argv)
    out = capsys.readouterr()
    return exc.value.code, out.out, out.err


@pytest.fixture(scope="module")
def sweep_report(store, tmp_path_factory):
    """The report of the sweep's children, with the published numbers."""
    uri, pid = store
    out = tmp_path_factory.mktemp("report_out")
    result = report.report(report.parse_args(["--experiment", "rep", "--parent-run", pid, "--out", str(out),
                                              "--with-paper", "--tracking-uri", uri]))
    return out, result


def test_table1_has_paper_shape_with_mean_std_dash_and_partial_average(store, tmp_path, capsys):
    uri, pid = store
    code, out, err = _run(["--experiment", "rep", "--parent-run", pid, "--out", str(tmp_path),
                           "--tracking-uri", uri], capsys)
    assert code == 0, err
    rows = _read_csv(tmp_path / "table1.csv")
    assert rows[0] == ["Method", "Backbone", "Split1", "Split2", "Split3", "Split4", "Split5", "Avg"]
    body = {(r[0], r[1]): r[2:] for r in rows[1:]}
    assert set(body) == {("CapeX", "tiny (tests)"), ("CapeNext", "tiny (tests)")}
    # full, split k: seeds 0.50 + 0.01k and 0.52 + 0.01k → mean 51 + k, sample std sqrt(2)
    assert body[("CapeNext", "tiny (tests)")][:5] == [f"{51 + k:.2f} ± {math.sqrt(2):.2f}" for k in range(1, 6)]
    assert body[("CapeNext", "tiny (tests)")][5] == f"54.00 ± {math.sqrt(2):.2f}"  # all five splits: no †
    assert body[("CapeX", "tiny (tests)")] == ["40.00", "40.00", "40.00", "—", "—", "40.00†"]
    assert "paper (published)" not in out
    assert "| CapeNext | tiny (tests) | 52.00 ± 1.41 |" in (tmp_path / "report.md").read_text()


def test_ablation_tables_show_missing_settings_as_dashes(sweep_report):
    out, _ = sweep_report
    table2 = [r for r in _read_csv(out / "table2.csv")[1:] if r[1] == "ours"]
    assert [r[0] for r in table2] == ["CapeNext", "CapeNext w/o HCMI", "CapeNext w/o DSFR", "CapeNext w/o LW"]
    by = {r[0]: r[2:] for r in table2}
    assert by["CapeNext w/o HCMI"] == ["45.00", "—", "—", "—", "—", "45.00†"]
    assert by["CapeNext w/o DSFR"] == ["—"] * 6  # its only run is outside the sweep
    assert by["CapeNext w/o LW"][:3] == ["47.00", "47.00", "—"]
    table3 = _read_csv(out / "table3.csv")
    assert [r[0] for r in table3[1:] if r[1] == "ours"] == ["Baseline", "+img emb", "+cls emb", "+img & cls emb"]


def test_with_paper_puts_published_rows_beside_ours(sweep_report):
    out, _ = sweep_report
    rows = _read_csv(out / "table1.csv")
    assert rows[0][:3] == ["Method", "Backbone", "Source"]
    published = {(r[0], r[1]): r[3:] for r in rows[1:] if r[2] == "paper (published)"}
    assert published[("CapeNext", "Swinv2-T")] == ["92.44", "87.31", "85.44", "86.47", "90.17", "88.37"]
    assert published[("CapeX", "Swinv2-T")][-1] == "87.61"
    assert ("POMNet", "ResNet-50") in published
    table2 = _read_csv(out / "table2.csv")
    assert ["CapeNext w/o DSFR", "paper (published)", "89.04", "82.72", "82.94", "82.97", "83.58", "84.25"] in table2
    md = (out / "report.md").read_text()
    assert "paper (published)" in md and "not produced by this code" in md


def test_unfinished_and_outside_runs_stay_out_of_the_tables(sweep_report, store, tmp_path, capsys):
    out, result = sweep_report
    data = result["data"]
    assert len(data.unfinished) == 1 and data.unfinished.status.iloc[0] == "RUNNING"
    assert "no_dsfr" not in set(data.finished.ablation)
    assert len(data.finished) == 10 + 3 + 1 + 2
    runs = _read_csv(out / "runs.csv")
    assert len(runs) == 1 + 16 and "test/pck_0.2" in runs[0]
    # without --parent-run, the experiment's every training run counts, the outside no_dsfr one included
    uri, _ = store
    code, _, err = _run(["--experiment", "rep", "--out", str(tmp_path), "--tracking-uri", uri], capsys)
    assert code == 0, err
    table2 = {r[0]: r[1:] for r in _read_csv(tmp_path / "table2.csv")[1:]}
    assert table2["CapeNext w/o DSFR"][0] == "33.00"


def test_mpck_and_threshold_tables(sweep_report):
    out, _ = sweep_report
    mpck = _read_csv(out / "mpck.csv")
    assert mpck[0] == ["Ablation", "Backbone", "Split1", "Split2", "Split3", "Split4", "Split5", "Avg"]
    full = next(r for r in mpck if r[0] == "full")
    assert full[2] == f"47.00 ± {math.sqrt(2):.2f}"  # mean over t of pck + (t - 0.2) is pck - 0.05
    thr = _read_csv(out / "pck_thresholds.csv")
    assert thr[0] == ["Ablation", "Backbone", "PCK@0.05", "PCK@0.1", "PCK@0.15", "PCK@0.2", "PCK@0.25", "mPCK",
                      "Splits"]
    base = next(r for r in thr if r[0] == "baseline")
    assert base[2:] == ["25.00", "30.00", "35.00", "40.00", "45.00", "35.00", "3"]
    floor = next(r for r in thr if r[0] == "mean-position floor")
    assert floor[2:7] == ["30.00"] * 5


def test_noise_evaluations_become_tables_4_and_5(sweep_report):
    out, result = sweep_report
    assert {t.name for t in result["tables"]} >= {"table4", "table5"}
    t4 = {(r[0], r[1]): r[2:] for r in _read_csv(out / "table4.csv")[1:]}
    assert t4[("Ours w/ LW", "ours")][0] == "49.00" and t4[("Ours w/o LW", "ours")][0] == "44.00"
    assert t4[("Ours w/ LW", "paper (published)")][-1] == "88.15"
    t5 = _read_csv(out / "table5.csv")
    # our approximations are labelled and set against nothing; the reference's own typo texts are the paper's column
    assert t5[0] == ["Method", "Source", "≈ keypoint typo (rate 0.1)", "≈ paw→foreleg (every text)",
                     "reference texts: typo"]
    rows = {(r[0], r[1]): r[2:] for r in t5[1:]}
    assert rows[("CapeNext", "ours")] == ["30.00†", "40.00†", "50.00†"]
    assert rows[("CapeX", "ours")] == ["20.00†", "30.00†", "40.00†"]
    assert rows[("CapeX", "paper (published)")] == ["—", "—", "64.10"]
    assert any("≈: our approximation" in line for line in (out / "report.md").read_text().splitlines())


def test_no_tables_4_and_5_without_evaluation_runs(tmp_path, capsys):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    exp = client.create_experiment("plain", artifact_location=(tmp_path / "art").as_uri())
    _log_training(client, exp, None, 2, "full", 0, 0.6)
    code, out, err = _run(["--experiment", "plain", "--out", str(tmp_path / "out"), "--tracking-uri", uri], capsys)
    assert code == 0, err
    assert not (tmp_path / "out" / "table4.csv").exists() and "Table 4" not in out
    rows = _read_csv(tmp_path / "out" / "table1.csv")
    assert rows[2] == ["CapeNext", "tiny (tests)", "—", "60.00", "—", "—", "—", "60.00†"]


def test_plots_are_pngs_that_open(sweep_report):
    import matplotlib.image as mpimg

    out, result = sweep_report
    for name in ("pck_vs_threshold.png", "per_split_bars.png", "curves.png"):
        path = out / name
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
        image = mpimg.imread(path)
        assert image.ndim == 3 and image.shape[0] > 200 and image.shape[1] > 400, (name, image.shape)
        assert image[..., :3].std() > 0.05, f"{name} is blank"
    assert "![curves](curves.png)" in (out / "report.md").read_text()


@pytest.mark.parametrize("case", ["experiment", "parent", "store"])
def test_bad_input_gives_one_line(store, tmp_path, capsys, case):
    uri, _ = store
    argv, fragment = {
        "experiment": (["--experiment", "nope", "--tracking-uri", uri], "experiment 'nope' not found"),
        "parent": (["--experiment", "rep", "--parent-run", "0" * 32, "--tracking-uri", uri], "--parent-run"),
        "store": (["--experiment", "rep", "--tracking-uri", f"sqlite:///{tmp_path / 'none.db'}"], "no MLflow store"),
    }[case]
    code, _, err = _run(argv + ["--out", str(tmp_path / "o")], capsys)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0], err


@pytest.fixture(scope="module")
def edge_report(tmp_path_factory):
    """An experiment 'edge': full on tiny, split 1 run twice (the newer run at 0.60 replaces the older at
    0.50, both logging floor/ at 0.3), split 2 once with its floor at 0.5; a stale RUNNING
    swinv2_t run; evaluations of the newer split-1 run under an unknown noise kind, the reference texts and
    class noise."""
    root = tmp_path_factory.mktemp("edge_store")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    client = MlflowClient(uri)
    exp = client.create_experiment("edge", artifact_location=(root / "mlartifacts").as_uri())
    _log_training(client, exp, None, 1, "full", 0, 0.50, end_time=1_000)
    newer = _log_training(client, exp, None, 1, "full", 0, 0.60, end_time=2_000)
    _log_training(client, exp, None, 2, "full", 0, 0.70, floor=0.5)
    _log_training(client, exp, None, 1, "full", 0, 0.99, status="RUNNING", backbone="swinv2_t")
    _log_evaluation(client, exp, newer, "blur", "blur:3", 0.25)
    _log_evaluation(client, exp, newer, "reference", "reference:manual", 0.55)
    _log_evaluation(client, exp, newer, "class", "class", 0.58)
    out = root / "out"
    env_before = os.environ.get("MLFLOW_TRACKING_URI")
    with pytest.raises(SystemExit) as exc:
        run_main(report.main, ["--experiment", "edge", "--out", str(out), "--tracking-uri", uri, "--with-paper"])
    assert exc.value.code == 0
    assert os.environ.get("MLFLOW_TRACKING_URI") == env_before  # the search leaves the process's URI alone
    return out


def test_floor_is_averaged_over_the_splits(edge_report, capsys):
    thr = _read_csv(edge_report / "pck_thresholds.csv")
    floor = next(r for r in thr if r[0] == "mean-position floor")
    assert floor[2:] == ["40.00"] * 6 + ["2"]  # split 1's floor 30, split 2's 50
    runs = _read_csv(edge_report / "runs.csv")
    assert "floor/pck_0.2" in runs[0] and not any(c.startswith("baseline/") for c in runs[0])
    col = runs[0].index("floor/pck_0.2")
    assert sorted(float(r[col]) for r in runs[1:]) == [0.3, 0.5]


def test_every_noise_kind_gets_a_column_unknown_ones_by_name(edge_report):
    t5 = _read_csv(edge_report / "table5.csv")
    assert t5[0] == ["Method", "Source", "reference texts: manual", "blur:3"]
    rows = {(r[0], r[1]): r[2:] for r in t5[1:]}
    assert rows[("CapeNext", "ours")] == ["55.00†", "25.00†"]
    assert rows[("CapeNext", "paper (published)")] == ["87.30", "—"]  # manual: paw→foreleg, the paper's column
    t4 = {(r[0], r[1]): r[2:] for r in _read_csv(edge_report / "table4.csv")[1:]}
    assert t4[("Ours w/ LW", "ours")][0] == "58.00"
    assert "| CapeNext | ours | 55.00† | 25.00† |" in (edge_report / "report.md").read_text()


def test_a_newer_run_of_the_same_cell_replaces_the_older_and_is_counted(edge_report):
    rows = {(r[0], r[1], r[2]): r[3:] for r in _read_csv(edge_report / "table1.csv")[1:]}
    assert rows[("CapeNext", "tiny (tests)", "ours")][:3] == ["60.00", "70.00", "—"]
    md = (edge_report / "report.md").read_text()
    assert "2 finished training runs (1 older run of the same cell ignored); 1 not finished yet" in md


def test_default_backbone_ignores_runs_not_finished(edge_report):
    # the stale RUNNING run is swinv2_t; the finished ones are tiny, so Tables 2-5 use tiny
    table2 = (edge_report / "report.md").read_text().split("### Table 2", 1)[1].splitlines()[0]
    assert "backbone tiny (tests)" in table2
    assert _read_csv(edge_report / "table2.csv")[1][:4] == ["CapeNext", "ours", "60.00", "70.00"]


def test_ablation_order_is_the_papers_then_other_registered_ones(monkeypatch):
    import capenext.models

    paper = ["full", "no_hcmi", "no_dsfr", "no_lw", "baseline", "img_only", "cls_only"]
    monkeypatch.setattr(capenext.models, "available_ablations", lambda: sorted(paper + ["zz_new"]))
    assert report.ablation_order() == paper + ["zz_new"]


def test_report_uses_the_shared_layer_not_other_jobs():
    for name in ("report.py", "reports/plots.py"):
        tree = ast.parse((Path(report.__file__).parent / name).read_text())
        imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
        imported |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        assert not imported & {"jobs.train", "jobs.sweep", "jobs.evaluate"}, (name, imported)
