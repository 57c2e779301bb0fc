"""jobs.report on a real MLflow store: runs logged with ``MlflowClient`` as the training and evaluation jobs
log them (tags split/ablation/backbone/seed, the config's params, ``test/pck_*``, ``floor/pck_*``, per-type
``test/<type>/pck_*``, per-epoch curves, every key from the library's own names), then the tables' shapes and
cells, the "—" and "mean ± 95 % interval (n)" cells, the paired differences against full, the keypoint-type
table, text encoders as row keys, CSV, the published numbers, noise variants, re-runs of a cell, the default
backbone, and the PNG files."""

from __future__ import annotations

import ast
import csv
import math
import os
from dataclasses import replace
from pathlib import Path

import pandas as pd
import pytest
from mlflow.entities import Metric
from mlflow.tracking import MlflowClient

from capenext.cli import run_main
from capenext.config import RunCfg, flatten, to_dict
from capenext.metrics import FLOOR, THRESHOLDS, metric_keys, pck_key
from jobs import report
from jobs.runtime.tracking import log_params

VAL = f"val/{pck_key(0.2)}"
T_975 = {1: 12.7062, 2: 4.3027}  # Student's t quantiles from a printed table, not from the code under test


def _pck(prefix: str, pck: float, step: int) -> list[Metric]:
    """``prefix/pck_*`` at every threshold, PCK@t = pck + (t - 0.2), and their mean."""
    values = [pck + (t - 0.2) for t in THRESHOLDS]
    return [Metric(k, v, 0, step) for k, v in zip(metric_keys(prefix), values + [sum(values) / len(values)])]


def _params(encoder: str) -> dict:
    """The params jobs.train logs (the flattened config) for a run with text encoder ``encoder``."""
    cfg = RunCfg()
    return flatten(to_dict(replace(cfg, model=replace(cfg.model, text_encoder=encoder))))


def _log_training(client: MlflowClient, exp: str, parent: str | None, split: int, ablation: str, seed: int,
                  pck: float, status: str = "FINISHED", backbone: str = "tiny", floor: float = 0.3,
                  end_time: int | None = None, encoder: str | None = None,
                  groups: dict[str, tuple[float, int]] | None = None) -> str:
    """One training run as jobs.train logs it; PCK@t = pck + (t - 0.2), the mean-position floor a flat
    ``floor``; with ``encoder``, the config's params naming it (without, no params: an older run, CLIP); with
    ``groups``, per keypoint type its PCK@0.2 and keypoint count."""
    name = f"rep-split{split}-{ablation}-{backbone}-seed{seed}" + (f"-{encoder}" if encoder else "")
    tags = {"split": str(split), "ablation": ablation, "backbone": backbone, "seed": str(seed),
            "capenext.run_name": name, "mlflow.runName": name}
    if parent:
        tags["mlflow.parentRunId"] = parent
    run_id = client.create_run(exp, run_name=name, tags=tags).info.run_id
    if encoder is not None:
        log_params(client, run_id, _params(encoder))
    shift = 0.1 * report.ablation_order().index(ablation)  # curves that tell the ablations apart in the plot
    metrics = [Metric("train/loss", 3.0 - 0.5 * e - 0.1 * seed + shift, 0, e) for e in range(3)]
    metrics += [Metric(VAL, 0.1 * (e + 1) + shift / 4, 0, e) for e in range(3)]
    if status == "FINISHED":
        metrics += _pck("test", pck, 3)
        metrics += [Metric(k, floor, 0, 3) for k in metric_keys(FLOOR)]
        for group, (value, count) in (groups or {}).items():
            metrics += _pck(f"test/{group}", value, 3) + [Metric(f"test/{group}/keypoints", count, 0, 3)]
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
    # full, split k: seeds 0.50 + 0.01k and 0.52 + 0.01k → mean 51 + k, sample std sqrt(2), n = 2: the 95 %
    # t-interval's half-width is t(0.975, 1) · sqrt(2) / sqrt(2)
    half = T_975[1] * math.sqrt(2) / math.sqrt(2)
    assert body[("CapeNext", "tiny (tests)")][:5] == [f"{51 + k:.2f} ± {half:.2f} (n=2)" for k in range(1, 6)]
    assert body[("CapeNext", "tiny (tests)")][5] == f"54.00 ± {half:.2f} (n=2)"  # all five splits: no †
    assert body[("CapeX", "tiny (tests)")] == ["40.00", "40.00", "40.00", "—", "—", "40.00†"]  # one seed: no ±
    assert "paper (published)" not in out
    md = (tmp_path / "report.md").read_text()
    assert "| CapeNext | tiny (tests) | 52.00 ± 12.71 (n=2) |" in md
    assert "_± is the half-width of the 95 % t-interval of the mean over n seeds" in md


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
    assert full[2] == "47.00 ± 12.71 (n=2)"  # mean over t of pck + (t - 0.2) is pck - 0.05
    thr = _read_csv(out / "pck_thresholds.csv")
    assert thr[0] == ["Ablation", "Backbone", "PCK@0.05", "PCK@0.1", "PCK@0.15", "PCK@0.2", "PCK@0.25", "mPCK",
                      "Splits"]
    base = next(r for r in thr if r[0] == "baseline")
    assert base[2:] == ["25.00", "30.00", "35.00", "40.00", "45.00", "35.00", "3"]
    floor = next(r for r in thr if r[0] == "mean-position floor")
    assert floor[2:7] == ["30.00"] * 5


def test_paired_differences_of_single_seeds_show_the_value_alone(sweep_report):
    """The 'rep' runs pair on seed 0 only: each difference is one value, with no interval; no per-type table."""
    out, _ = sweep_report
    rows = _read_csv(out / "seeds.csv")
    assert rows[0] == ["Ablation", "Backbone", "Metric", "Split", "Difference (pp)", "95% interval", "n",
                       "Excludes 0"]
    by = {(r[0], r[3]): r[4:] for r in rows[1:]}
    # baseline (40) against full's seed 0 (50 + k) on splits 1-3; Avg over the three
    assert [by[("baseline", f"Split{k}")][0] for k in (1, 2, 3)] == ["-11.00", "-12.00", "-13.00"]
    assert by[("baseline", "Avg")] == ["-12.00", "—", "1", "—"]
    assert by[("no_hcmi", "Split1")] == ["-6.00", "—", "1", "—"] and ("no_hcmi", "Avg") not in by
    assert "### Paired differences vs full" in (out / "report.md").read_text()
    assert not (out / "keypoint_types.csv").exists()  # no run logged per-type metrics (as on MP-100)
    assert "Polysemous vs unambiguous" not in (out / "report.md").read_text()
    assert not (out / "encoders.csv").exists()  # one text encoder: nothing to pair it with


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

    out, _ = sweep_report
    for name in ("pck_vs_threshold.png", "per_split_bars.png", "curves.png", "seeds.png"):
        path = out / name
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
        image = mpimg.imread(path)
        assert image.ndim == 3 and image.shape[0] > 200 and image.shape[1] > 400, (name, image.shape)
        assert image[..., :3].std() > 0.05, f"{name} is blank"
    assert "![curves](curves.png)" in (out / "report.md").read_text()
    assert "![seeds](seeds.png)" in (out / "report.md").read_text()


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


# --- intervals over seeds, paired differences, keypoint types, text encoders --------------------------


def test_t_interval_of_known_values():
    stat = report.summarize([1.0, 2.0, 3.0])
    assert (stat.mean, stat.std, stat.n) == (2.0, 1.0, 3)
    assert stat.half == pytest.approx(T_975[2] / math.sqrt(3), abs=1e-3)  # 2.484
    assert report.fmt(stat) == "2.00 ± 2.48 (n=3)" and report.fmt(stat, "†") == "2.00 ± 2.48 (n=3)†"
    assert [report.t975(df) for df in (1, 2)] == pytest.approx([T_975[1], T_975[2]], abs=1e-3)
    assert report.t975(10_000) == pytest.approx(1.960, abs=1e-3)
    one = report.summarize([5.0, math.nan])
    assert one.n == 1 and math.isnan(one.half) and report.fmt(one) == "5.00"  # one seed: the value alone
    assert report.summarize([]) is None and report.fmt(None) == "—"
    assert report.summarize([-1.0, -2.0, -3.0]).excludes_zero() is False  # -2 ± 2.48 holds 0
    assert report.summarize([-10.0, -9.0, -11.0]).excludes_zero() is True  # -10 ± 2.48 does not


def test_paired_differences_match_by_seed():
    """A seed one of the two ablations lacks (full's 0, no_lw's 3) is left out, as is a run without a seed."""
    rows = [(1, "full", "0", 0.50), (1, "full", "1", 0.60), (1, "full", "2", 0.70), (1, "full", "?", 0.10),
            (1, "no_lw", "1", 0.50), (1, "no_lw", "2", 0.65), (1, "no_lw", "3", 0.10), (1, "no_lw", "?", 0.90),
            (2, "full", "1", 0.40), (2, "full", "2", 0.40), (2, "no_lw", "1", 0.44)]
    frame = pd.DataFrame([{"split": k, "ablation": a, "backbone": "tiny", "encoder": "clip", "seed": seed,
                           "test/pck_0.2": v} for k, a, seed, v in rows])
    got = report.paired_differences(frame, "test/pck_0.2", "no_lw", "tiny")
    assert set(got) == {"Split1", "Split2", "Avg"}
    assert (got["Split1"].mean, got["Split1"].n) == pytest.approx((-7.5, 2))  # seeds 1 (-10) and 2 (-5)
    assert got["Split1"].std == pytest.approx(math.sqrt(12.5))
    assert (got["Split2"].mean, got["Split2"].n) == pytest.approx((4.0, 1))  # seed 2 has no no_lw run there
    assert (got["Avg"].mean, got["Avg"].n) == pytest.approx(((-10 + 4) / 2, 1))  # seed 1: paired on both splits
    assert report.paired_differences(frame, "test/pck_0.2", "baseline", "tiny") == {}
    assert report.paired_differences(frame, "test/pck_0.2", "no_lw", "tiny", encoder="wordllama") == {}


@pytest.fixture(scope="module")
def seeds_report(tmp_path_factory):
    """An experiment 'seeds' on backbone tiny, every run logging per-type PCK (polysemous: PCK@0.2 - 0.10 for
    full, - 0.20 for no_hcmi; unambiguous: + 0.05; 40 and 160 keypoints):

    * CLIP (full without the param, as an older run; no_hcmi with it): full seeds 0-2 at 0.60/0.62/0.64 on
      split 1 and 0.61/0.63/0.65 on split 2; no_hcmi seeds 0, 1 and 3 at 0.55/0.56/0.90 on split 1, seeds 0 and
      1 at 0.57/0.58 on split 2 (its seed 3 and full's seed 2 have no partner);
    * WordLlama: full seeds 0-2 at 0.70/0.72/0.74 and no_hcmi at 0.60/0.63/0.63, split 1 only.
    """
    root = tmp_path_factory.mktemp("seeds_store")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    client = MlflowClient(uri)
    exp = client.create_experiment("seeds", artifact_location=(root / "mlartifacts").as_uri())
    runs = {("full", None, 1): {0: 0.60, 1: 0.62, 2: 0.64}, ("full", None, 2): {0: 0.61, 1: 0.63, 2: 0.65},
            ("no_hcmi", "clip", 1): {0: 0.55, 1: 0.56, 3: 0.90}, ("no_hcmi", "clip", 2): {0: 0.57, 1: 0.58},
            ("full", "wordllama", 1): {0: 0.70, 1: 0.72, 2: 0.74},
            ("no_hcmi", "wordllama", 1): {0: 0.60, 1: 0.63, 2: 0.63}}
    for (ablation, encoder, split), by_seed in runs.items():
        drop = 0.10 if ablation == "full" else 0.20
        for seed, pck in by_seed.items():
            groups = {"polysemous": (pck - drop, 40), "unambiguous": (pck + 0.05, 160)}
            _log_training(client, exp, None, split, ablation, seed, pck, encoder=encoder, groups=groups)
    out = root / "out"
    result = report.report(report.parse_args(["--experiment", "seeds", "--out", str(out), "--tracking-uri", uri]))
    return out, result


def test_keypoint_type_names_are_the_ones_evaluation_logs(seeds_report):
    """The per-type metrics the fixture logs (``metric_keys("test/<type>")``) are the ones the report reads."""
    _, result = seeds_report
    assert report.keypoint_groups(result["data"]) == ["polysemous", "unambiguous"]
    assert {report.group_key(g) for g in report.KEYPOINT_GROUPS} <= set(result["data"].finished.columns)


def test_cells_show_the_95_interval_per_text_encoder(seeds_report):
    out, result = seeds_report
    assert set(result["data"].finished.encoder) == {"clip", "wordllama"}  # full's runs have no param: CLIP
    rows = _read_csv(out / "table1.csv")
    assert rows[0] == ["Method", "Backbone", "Text encoder", "Split1", "Split2", "Split3", "Split4", "Split5", "Avg"]
    body = {(r[0], r[2]): r[3:] for r in rows[1:]}
    half = T_975[2] * 2 / math.sqrt(3)  # three seeds 2 points apart: std 2
    assert f"{half:.2f}" == "4.97"
    # Avg: per seed the mean of its two splits (60.5, 62.5, 64.5)
    assert body[("CapeNext", "clip")] == ["62.00 ± 4.97 (n=3)", "63.00 ± 4.97 (n=3)", "—", "—", "—",
                                          "62.50 ± 4.97 (n=3)†"]
    assert body[("CapeNext", "wordllama")] == ["72.00 ± 4.97 (n=3)", "—", "—", "—", "—", "72.00 ± 4.97 (n=3)†"]
    assert body[("CapeX", "clip")] == ["—"] * 6
    table2 = {(r[0], r[1]): r[2:] for r in _read_csv(out / "table2.csv")[1:]}
    assert table2[("CapeNext w/o HCMI", "wordllama")][0] == "62.00 ± 4.30 (n=3)"  # 60, 63, 63: std sqrt(3)
    # unequal seeds per split: the splits keep every seed (split 1: 55, 56, 90), Avg the two seeds both splits have
    # (0: 56, 1: 57)
    assert table2[("CapeNext w/o HCMI", "clip")] == ["67.00 ± 49.50 (n=3)", "57.50 ± 6.35 (n=2)", "—", "—", "—",
                                                     "56.50 ± 6.35 (n=2)†"]
    md = (out / "report.md").read_text()
    assert "| CapeNext | tiny (tests) | wordllama | 72.00 ± 4.97 (n=3) |" in md
    assert "An Avg with ± is the mean and interval of each seed's mean across the splits present" in md


def test_paired_differences_vs_full_within_each_text_encoder(seeds_report):
    out, _ = seeds_report
    rows = _read_csv(out / "seeds.csv")
    assert rows[0] == ["Ablation", "Backbone", "Text encoder", "Metric", "Split", "Difference (pp)", "95% interval",
                       "n", "Excludes 0"]
    by = {(r[0], r[2], r[3], r[4]): r[5:] for r in rows[1:]}
    assert all(key[0] == "no_hcmi" for key in by)  # full is the reference, not a row
    # CLIP, split 1: seeds 0 (-5) and 1 (-6) pair; no_hcmi's seed 3 and full's seed 2 do not
    assert by[("no_hcmi", "clip", "PCK@0.2", "Split1")] == ["-5.50 ± 6.35", "[-11.85, +0.85]", "2", "no"]
    assert by[("no_hcmi", "clip", "PCK@0.2", "Split2")] == ["-4.50 ± 6.35", "[-10.85, +1.85]", "2", "no"]
    assert by[("no_hcmi", "clip", "PCK@0.2", "Avg")] == ["-5.00 ± 6.35", "[-11.35, +1.35]", "2", "no"]
    # WordLlama: -10, -9, -11 → -10 ± 4.303/sqrt(3); its interval excludes 0
    assert by[("no_hcmi", "wordllama", "PCK@0.2", "Split1")] == ["-10.00 ± 2.48", "[-12.48, -7.52]", "3", "yes"]
    assert ("no_hcmi", "wordllama", "PCK@0.2", "Avg") not in by  # one split: no Avg
    # per keypoint type: no_hcmi loses 10 points more on the polysemous keypoints, none on the others
    assert by[("no_hcmi", "wordllama", "PCK@0.2 polysemous", "Split1")][:2] == ["-20.00 ± 2.48", "[-22.48, -17.52]"]
    assert by[("no_hcmi", "wordllama", "PCK@0.2 unambiguous", "Split1")][0] == "-10.00 ± 2.48"
    md = (out / "report.md").read_text()
    assert "### Paired differences vs full (ablation − full, seed by seed)" in md
    assert "| no_hcmi | tiny (tests) | wordllama | PCK@0.2 | Split1 | -10.00 ± 2.48 | [-12.48, -7.52] | 3 | yes |" in md


def test_paired_differences_of_each_text_encoder_against_clip(seeds_report):
    out, _ = seeds_report
    rows = _read_csv(out / "encoders.csv")
    assert rows[0] == ["Ablation", "Backbone", "Text encoder", "Metric", "Split", "Difference (pp)", "95% interval",
                       "n", "Excludes 0"]
    by = {(r[0], r[3], r[4]): r[5:] for r in rows[1:]}
    assert {r[2] for r in rows[1:]} == {"wordllama − clip"}
    # full, split 1: +10 on every seed (70-60, 72-62, 74-64): no spread
    assert by[("full", "PCK@0.2", "Split1")] == ["+10.00 ± 0.00", "[+10.00, +10.00]", "3", "yes"]
    assert by[("full", "PCK@0.2 polysemous", "Split1")][0] == "+10.00 ± 0.00"
    # no_hcmi, split 1: seeds 0 (+5) and 1 (+7) pair; CLIP's seed 3 and WordLlama's seed 2 do not
    assert by[("no_hcmi", "PCK@0.2", "Split1")] == ["+6.00 ± 12.71", "[-6.71, +18.71]", "2", "no"]
    assert ("full", "PCK@0.2", "Split2") not in by  # WordLlama has no split 2
    assert "### Paired differences vs clip (text encoder − clip, seed by seed)" in (out / "report.md").read_text()


def test_polysemous_and_unambiguous_keypoints_get_a_table(seeds_report):
    out, _ = seeds_report
    rows = _read_csv(out / "keypoint_types.csv")
    assert rows[0] == ["Ablation", "Backbone", "Text encoder", "Split1 polysemous", "Split1 unambiguous",
                       "Split2 polysemous", "Split2 unambiguous", "Avg polysemous", "Avg unambiguous"]
    by = {(r[0], r[2]): r[3:] for r in rows[1:]}
    assert by[("full", "clip")] == ["52.00 ± 4.97 (n=3)", "67.00 ± 4.97 (n=3)", "53.00 ± 4.97 (n=3)",
                                    "68.00 ± 4.97 (n=3)", "52.50 ± 4.97 (n=3)†", "67.50 ± 4.97 (n=3)†"]
    assert by[("full", "wordllama")][:4] == ["62.00 ± 4.97 (n=3)", "77.00 ± 4.97 (n=3)", "—", "—"]
    md = (out / "report.md").read_text()
    assert "### Polysemous vs unambiguous keypoints" in md
    assert "split 1: 40 polysemous, 160 unambiguous; split 2: 40 polysemous, 160 unambiguous" in md


def test_cells_csv_keeps_mean_std_and_interval(seeds_report):
    out, _ = seeds_report
    rows = list(csv.DictReader((out / "cells.csv").open(newline="")))
    assert list(rows[0]) == report.CELLS_COLUMNS
    cell = next(r for r in rows if (r["ablation"], r["text_encoder"], r["metric"], r["split"])
                == ("full", "clip", "test/pck_0.2", "1"))
    assert (cell["n"], cell["mean"], cell["std"]) == ("3", "62.0000", "2.0000")
    assert float(cell["ci95_half"]) == pytest.approx(T_975[2] * 2 / math.sqrt(3), abs=1e-3)
    assert float(cell["ci95_low"]) == pytest.approx(62.0 - float(cell["ci95_half"]), abs=1e-3)
    assert any(r["metric"] == "test/polysemous/pck_mean" and r["split"] == "avg" for r in rows)
    runs = list(csv.DictReader((out / "runs.csv").open(newline="")))
    assert {r["text_encoder"] for r in runs} == {"clip", "wordllama"} and len(runs) == 3 + 3 + 3 + 2 + 3 + 3


def test_seeds_plot_is_a_png_that_opens(seeds_report):
    import matplotlib.image as mpimg

    out, result = seeds_report
    image = mpimg.imread(out / "seeds.png")
    assert image.ndim == 3 and image.shape[1] > 800 and image[..., :3].std() > 0.05
    assert out / "seeds.png" in result["files"]
