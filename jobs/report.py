"""Paper-style tables and plots from MLflow: ``python -m jobs.report --experiment NAME``.

Reads the training runs of an experiment (or the children of one sweep's parent run, ``--parent-run``)
with ``mlflow.search_runs`` (one pandas DataFrame) and writes, under ``--out``:

* ``report.md``: every table in Markdown, and one CSV per table (same cells):
  - Table 1 (``table1.csv``): rows method/backbone (CapeX = ablation ``baseline``, CapeNext = ``full``),
    columns Split1-5 and Avg, test PCK@0.2 in %;
  - Table 2 (``table2.csv``): the module ablations ``full``, ``no_hcmi``, ``no_dsfr``, ``no_lw``;
  - Table 3 (``table3.csv``): ``baseline`` → ``img_only`` (+img) → ``full`` (+img & cls), and ``cls_only``;
  - ``mpck.csv``: the mean of PCK@0.05-0.25 per split; ``pck_thresholds.csv``: PCK at every threshold,
    averaged over the splits, next to the per-name mean-position floor (metrics ``floor/pck_*``, read as
    ``baseline/pck_*`` from runs logged under the older name);
  - Tables 4 and 5 (``table4.csv``, ``table5.csv``), when evaluation runs exist (``capenext.kind=evaluation``,
    tags ``noise``, ``noise_variant``, ``training_run_id``): PCK@0.2 under noisy class prompts (noise
    ``class``), and under every other noise variant logged, one column each (``typo@R``, ``template:NAME``,
    ``reference:NAME`` for the official code's own texts, ``clean``, and any other by its name);
* ``runs.csv``: one numeric row per finished run (the raw data behind the tables);
* ``pck_vs_threshold.png``, ``per_split_bars.png``, ``curves.png`` (training loss and val PCK@0.2 per
  epoch), drawn by :mod:`jobs.report_plots`.

A cell averages the runs of one (split, ablation, backbone) over their seeds: "mean ± std" when there
are several, "—" when there are none; of several finished runs of one seed, the newest counts. Avg is the
mean of the splits present; marked † when fewer than five are. Only FINISHED runs enter the tables, so
the report works while a sweep is still running (the curves also show running runs, dashed).
``--with-paper`` adds the published numbers of the CapeNext paper (``paper_results.json``, Tables 1-5),
each row labelled "paper (published)".
"""

from __future__ import annotations

import argparse
import json
import math
import os
from contextlib import contextmanager
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, NamedTuple

import pandas as pd

from capenext.cli import UsageError, run_main
from capenext.data.mp100 import SPLITS
from capenext.metrics import FLOOR, LEGACY_FLOOR, THRESHOLDS, metric_keys, pck_key
from jobs import report_plots as plots
from jobs.tracking import find_run, open_client, require_store, tracking_uri

DASH = "—"
PUBLISHED = "paper (published)"
FLOOR_LABEL = "mean-position floor"
MAIN = f"test/{pck_key(0.2)}"
MPCK = metric_keys("test", thresholds=())[0]  # test/pck_mean
CURVE_KEYS = ("train/loss", f"val/{pck_key(0.2)}")

PAPER = json.loads(resources.files("jobs").joinpath("paper_results.json").read_text(encoding="utf-8"))
PAPER_TABLE1 = [(r[0], r[1], r[2], tuple(r[3:])) for r in PAPER["table1"]["rows"]]  # method, backbone, CLIP
TEMPLATE_ORDER = tuple(PAPER["template_order"])
BACKBONE_NAMES = {**PAPER["backbones"], "tiny": "tiny (tests)"}  # the paper's names, in its Table 1 order
METHODS = tuple(PAPER["methods"].items())  # Table 1: (ablation, method)
CLASS_NOISE = "class"  # Table 4's noise kind; every other kind is a column of Table 5
SPLIT_COLUMNS = [f"Split{k}" for k in SPLITS] + ["Avg"]
PARTIAL_NOTE = "† mean over the splits present (fewer than five)."
LABEL_COLUMNS = {"Method", "Backbone", "Source", "Setting", "Ablation"}  # left-aligned in Markdown
CELL = ["split", "ablation", "backbone", "seed"]  # one training run per cell counts


def paper_rows(table: str) -> list[tuple[str, str, Any]]:
    """(ablation, row label, published values or None) of one of the paper's Tables 2-5."""
    return [(r["ablation"], r["label"], r["published"]) for r in PAPER[table]["rows"]]


def ablation_order() -> list[str]:
    """The paper's seven ablations in its order, then every other registered one."""
    from capenext.models import available_ablations  # the model registry (imports timm): only when used

    paper = list(PAPER["ablation_order"])
    return paper + [a for a in available_ablations() if a not in paper]


def backbone_name(backbone: str) -> str:
    return BACKBONE_NAMES.get(backbone, backbone)


# --- command line -----------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m jobs.report",
        description="Turn the MLflow runs of an experiment (or of one sweep) into the paper's tables "
                    "(Markdown + CSV) and plots (PNG). Only finished runs enter the tables, so it also works "
                    "while a sweep is running.",
    )
    p.add_argument("--experiment", required=True, help="MLflow experiment (the sweep's --experiment)")
    p.add_argument("--parent-run", default=None, metavar="ID",
                   help="only the child runs of this sweep parent run (default: every training run)")
    p.add_argument("--out", type=Path, default=None, help="output folder (default report/<experiment>)")
    p.add_argument("--with-paper", action="store_true",
                   help="put the paper's published numbers beside ours, labelled 'paper (published)'")
    p.add_argument("--backbone", default=None,
                   help="backbone of Tables 2-5 and the bar plot (default swinv2_t if it has finished runs, "
                        "else the backbone with the most finished runs)")
    p.add_argument("--tracking-uri", default=None,
                   help="MLflow store or server (default MLFLOW_TRACKING_URI, else sqlite:///./mlflow.db)")
    return p.parse_args(argv)


# --- reading MLflow ---------------------------------------------------------------------------------


@dataclass
class Data:
    """The runs as DataFrames. ``finished``/``unfinished``: training runs, columns ``run_id``, ``name``,
    ``split``, ``ablation``, ``backbone``, ``seed``, ``status``, ``end_time`` and one per metric;
    ``evals``: evaluation runs, columns ``run_id``, ``start_time``, ``noise``, ``variant``, the cell of the
    training run they evaluated, ``seed`` (``<training seed>:<noise seed>``) and ``pck`` (PCK@0.2)."""

    finished: pd.DataFrame
    unfinished: pd.DataFrame
    evals: pd.DataFrame
    replaced: int = 0  # finished runs that a newer finished run of the same cell replaced


@contextmanager
def _tracking(uri: str):
    """``mlflow.search_runs`` reads the process-wide tracking URI: set it for the search, then put it back."""
    import mlflow

    before = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    try:
        yield mlflow
    finally:
        mlflow.set_tracking_uri(before)  # None unsets it again


def search(uri: str, experiment_id: str, query: str) -> pd.DataFrame:
    with _tracking(uri) as mlflow:
        return mlflow.search_runs(experiment_ids=[experiment_id], filter_string=query, output_format="pandas")


def _column(frame: pd.DataFrame, name: str) -> pd.Series:
    """A column, or one of missing values when no run has it (MLflow leaves such columns out)."""
    if name in frame:
        return frame[name].where(frame[name] != "")
    return pd.Series(None, index=frame.index, dtype=object)


def _cells(tags: pd.DataFrame) -> pd.DataFrame:
    """``split`` (int), ``ablation``, ``backbone``, ``seed`` from the ``tags.*`` columns; rows that lack a
    whole-number split, an ablation or a backbone are dropped."""
    split = pd.to_numeric(_column(tags, "tags.split"), errors="coerce")
    out = pd.DataFrame({"split": split, "ablation": _column(tags, "tags.ablation"),
                        "backbone": _column(tags, "tags.backbone"),
                        "seed": _column(tags, "tags.seed").fillna("?")}, index=tags.index)
    out = out[(split % 1 == 0) & out.ablation.notna() & out.backbone.notna()]
    return out.astype({"split": int, "ablation": str, "backbone": str, "seed": str})


def _metrics(raw: pd.DataFrame) -> pd.DataFrame:
    """The ``metrics.*`` columns without their prefix; the floor's legacy ``baseline/`` metrics become
    ``floor/`` ones (a run that has both keeps its ``floor/`` value)."""
    m = raw[[c for c in raw if c.startswith("metrics.")]].rename(columns=lambda c: c[len("metrics."):])
    for legacy in [c for c in m if c.startswith(f"{LEGACY_FLOOR}/")]:
        key = f"{FLOOR}/{legacy[len(LEGACY_FLOOR) + 1:]}"
        m[key] = m[key].fillna(m[legacy]) if key in m else m[legacy]
        m = m.drop(columns=legacy)
    return m


def training_frame(raw: pd.DataFrame) -> pd.DataFrame:
    """One row per training run of a ``search_runs`` frame (sweep parents and evaluations left out)."""
    kind = _column(raw, "tags.capenext.kind")
    raw = raw[~kind.isin(["sweep", "evaluation"])]
    cells = _cells(raw)
    raw = raw.loc[cells.index]
    name = _column(raw, "tags.capenext.run_name").fillna(_column(raw, "tags.mlflow.runName")).fillna(raw.run_id)
    head = pd.DataFrame({"run_id": raw.run_id, "name": name}, index=raw.index)
    return pd.concat([head, cells, raw[["status", "end_time"]], _metrics(raw)], axis=1)


def _run_frame(run) -> pd.DataFrame:
    """One ``MlflowClient`` run in ``search_runs``'s layout."""
    return pd.DataFrame([{"run_id": run.info.run_id, **{f"tags.{k}": v for k, v in run.data.tags.items()}}])


def evaluation_frame(client, raw: pd.DataFrame, trained: pd.DataFrame, parent: str | None) -> pd.DataFrame:
    """The finished evaluation runs, each with the cell of the training run it evaluated: one of
    ``trained``; outside them, none with ``parent`` (it evaluates a run outside the sweep), else the
    training run read from the store, else the evaluation run's own tags."""
    columns = ["run_id", "start_time", "noise", "variant", "split", "ablation", "backbone", "seed", "pck"]
    raw = raw[raw.status == "FINISHED"]
    if raw.empty:
        return pd.DataFrame(columns=columns)
    metrics = _metrics(raw)
    pck = pd.Series(float("nan"), index=raw.index)
    for key in ["test/pck_0.2", "eval/pck_0.2", "pck_0.2"] + [k for k in metrics if k.endswith("pck_0.2")]:
        if key in metrics:
            pck = pck.fillna(metrics[key])
    noise = _column(raw, "tags.noise").fillna("")
    ev = pd.DataFrame({"run_id": raw.run_id, "start_time": raw.start_time, "noise": noise,
                       "variant": _column(raw, "tags.noise_variant").fillna(noise), "pck": pck,
                       "training_run_id": _column(raw, "tags.training_run_id").fillna(""),
                       "noise_seed": _column(raw, "params.seed").fillna(_column(raw, "params.noise_seed"))
                       .fillna(raw.run_id)})
    ev = ev[(ev.variant != "") & ev.pck.notna()]
    known = trained.set_index("run_id")[["split", "ablation", "backbone", "seed"]]
    if parent is None:  # training runs of other experiments, then the evaluation run's own tags
        outside = [find_run(client, i) for i in set(ev.training_run_id) - set(known.index) - {""}]
        fetched = [_run_frame(r) for r in outside if r is not None]
        if fetched:
            runs = pd.concat(fetched, ignore_index=True)
            known = pd.concat([known, _cells(runs).set_index(runs.run_id)])
        own = _cells(raw.set_index(raw.run_id))
        cell = known.reindex(ev.training_run_id).set_axis(ev.index).fillna(own.reindex(ev.run_id).set_axis(ev.index))
    else:
        cell = known.reindex(ev.training_run_id).set_axis(ev.index)
    ev = pd.concat([ev, cell], axis=1).dropna(subset=["split", "ablation"])
    ev = ev.astype({"split": int}).assign(seed=lambda f: f.seed.astype(str) + ":" + f.noise_seed.astype(str))
    return ev.sort_values("start_time", kind="stable")[columns].reset_index(drop=True)


def load(client, uri: str, experiment: str, parent: str | None) -> Data:
    """The experiment's training runs (children of ``parent`` if given) and its evaluation runs."""
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        names = sorted(e.name for e in client.search_experiments())
        raise UsageError(f"experiment {experiment!r} not found in the MLflow store; experiments: {names}")
    if parent is not None and find_run(client, parent) is None:
        raise UsageError(f"--parent-run {parent}: no such run in the MLflow store")
    query = f"tags.`mlflow.parentRunId` = '{parent}'" if parent else ""
    runs = training_frame(search(uri, exp.experiment_id, query))
    done = runs.status == "FINISHED"
    # the newest finished run per (split, ablation, backbone, seed): a re-run replaces an older one
    finished = (runs[done].sort_values("end_time", kind="stable", na_position="first")
                .drop_duplicates(CELL, keep="last").sort_values(["backbone", "ablation", "split", "seed"]))
    evals = evaluation_frame(client, search(uri, exp.experiment_id, "tags.`capenext.kind` = 'evaluation'"),
                             runs, parent)
    return Data(finished.reset_index(drop=True), runs[~done].reset_index(drop=True), evals,
                int(done.sum()) - len(finished))


# --- cells: mean ± std over seeds -------------------------------------------------------------------


class Stat(NamedTuple):
    """A cell in %: the mean and the sample std over seeds (NaN: one value)."""

    mean: float
    std: float


def fmt(stat: Stat | None, mark: str = "") -> str:
    """``45.12``, ``45.12 ± 1.03`` (several seeds), or ``—``."""
    if stat is None:
        return DASH
    text = f"{stat.mean:.2f}" if math.isnan(stat.std) else f"{stat.mean:.2f} ± {stat.std:.2f}"
    return text + mark


def values(frame: pd.DataFrame, metric: str, ablation: str, backbone: str) -> pd.DataFrame:
    """``split``, ``seed``, ``value`` (``metric`` × 100) of one (ablation, backbone)'s runs in MP-100's splits."""
    if metric not in frame:
        return pd.DataFrame(columns=["split", "seed", "value"])
    sel = frame[(frame.ablation == ablation) & (frame.backbone == backbone) & frame.split.isin(SPLITS)]
    sel = sel.dropna(subset=[metric])
    return pd.DataFrame({"split": sel.split, "seed": sel.seed, "value": 100.0 * sel[metric]})


def split_stats(vals: pd.DataFrame) -> tuple[list[Stat | None], Stat | None, int]:
    """Split1..Split5 cells over seeds, their average and how many splits it covers. The average's std is
    over the seeds that every present split has (each seed's own mean over the splits), so it shows seed
    noise, not split difficulty; with fewer than two such seeds it has none."""
    if vals.empty:
        return [None] * len(SPLITS), None, 0
    by_split = vals.groupby("split")["value"].agg(["mean", "std"])
    cells = [Stat(*by_split.loc[k]) if k in by_split.index else None for k in SPLITS]
    common = vals.pivot_table(index="seed", columns="split", values="value", aggfunc="last").dropna()
    if len(common) >= 2:
        per_seed = common.mean(axis=1)
        return cells, Stat(per_seed.mean(), per_seed.std()), len(by_split)
    return cells, Stat(by_split["mean"].mean(), math.nan), len(by_split)


def split_row(frame: pd.DataFrame, metric: str, ablation: str, backbone: str) -> tuple[list[str], bool]:
    """Split1..Split5 and Avg cells of one row; whether Avg covers fewer than five splits."""
    cells, avg, n = split_stats(values(frame, metric, ablation, backbone))
    partial = 0 < n < len(SPLITS)
    return [fmt(c) for c in cells] + [fmt(avg, "†" if partial else "")], partial


def published(vals) -> list[str]:
    return [f"{v:.2f}" for v in vals] if vals else [DASH] * (len(SPLITS) + 1)


def combos(data: Data) -> list[tuple[str, str]]:
    """The (ablation, backbone) pairs with finished runs, by backbone, then in the ablation order."""
    order = {a: i for i, a in enumerate(ablation_order())}
    have = set(zip(data.finished.ablation, data.finished.backbone))
    return sorted(have, key=lambda ab: (ab[1], order.get(ab[0], len(order)), ab[0]))


# --- tables -----------------------------------------------------------------------------------------


@dataclass
class Table:
    name: str  # file stem
    title: str
    frame: pd.DataFrame  # the cells, as text
    notes: list[str] = field(default_factory=list)

    def markdown(self) -> str:
        cols = list(self.frame.columns)
        lines = [f"### {self.title}", "", "| " + " | ".join(cols) + " |",
                 "|" + "|".join("---" if c in LABEL_COLUMNS else "---:" for c in cols) + "|"]
        lines += ["| " + " | ".join(row) + " |" for row in self.frame.itertuples(index=False)]
        for note in self.notes:  # one paragraph each
            lines += ["", f"_{note}_"]
        return "\n".join(lines) + "\n"

    def write_csv(self, folder: Path) -> Path:
        path = folder / f"{self.name}.csv"
        self.frame.to_csv(path, index=False, lineterminator="\r\n", encoding="utf-8")
        return path


def _table(name: str, title: str, columns: list[str], rows: list[list[str]], notes: list[str]) -> Table:
    return Table(name, title, pd.DataFrame(rows, columns=columns, dtype=str), notes)


def table1(data: Data, with_paper: bool, main: str) -> Table:
    have = set(zip(data.finished.ablation, data.finished.backbone))
    methods = [a for a, _ in METHODS]
    backbones = [b for b in PAPER["backbones"] if any((a, b) in have for a in methods)]
    backbones += sorted({b for a, b in have if a in methods and b not in backbones})
    rows, partial, shown = [], False, set()
    for ablation, method in METHODS:
        for b in backbones or [main]:
            label = backbone_name(b)
            cells, part = split_row(data.finished, MAIN, ablation, b)
            partial |= part
            rows.append([method, label] + (["ours"] if with_paper else []) + cells)
            match = [v for m, bb, _, v in PAPER_TABLE1 if m == method and bb == label]
            if with_paper and match:
                rows.append([method, label, PUBLISHED] + published(match[0]))
                shown.add((method, label))
    if with_paper:
        rows += [[m, bb, PUBLISHED] + published(v) for m, bb, _, v in PAPER_TABLE1 if (m, bb) not in shown]
    return _table("table1", PAPER["table1"]["title"],
                  ["Method", "Backbone"] + (["Source"] if with_paper else []) + SPLIT_COLUMNS, rows,
                  [PARTIAL_NOTE] if partial else [])


def setting_table(name: str, title: str, frame: pd.DataFrame, metric: str, with_paper: bool, main: str,
                  suffix: str = "") -> Table:
    """The rows of the paper's table ``name`` (label + ``suffix``) on the main backbone, each followed by
    the published row."""
    rows, partial, spec = [], False, paper_rows(name)
    for ablation, label, paper in spec:
        cells, part = split_row(frame, metric, ablation, main)
        partial |= part
        rows.append([label + suffix] + (["ours"] if with_paper else []) + cells)
        if with_paper:
            rows.append([label + suffix, PUBLISHED] + published(paper))
    notes = [PARTIAL_NOTE] if partial else []
    if with_paper and any(paper is None for *_, paper in spec):
        notes.append(f"{DASH} in a published row: the paper reports no such setting.")
    return _table(name, title, ["Setting"] + (["Source"] if with_paper else []) + SPLIT_COLUMNS, rows, notes)


def mpck_table(data: Data) -> Table:
    rows, partial = [], False
    for ablation, backbone in combos(data):
        cells, part = split_row(data.finished, MPCK, ablation, backbone)
        partial |= part
        rows.append([ablation, backbone_name(backbone)] + cells)
    return _table("mpck", "mPCK (%): the mean of PCK@0.05, 0.1, 0.15, 0.2 and 0.25, per split",
                  ["Ablation", "Backbone"] + SPLIT_COLUMNS, rows or [[DASH, DASH] + [DASH] * len(SPLIT_COLUMNS)],
                  [PARTIAL_NOTE] if partial else [])


def threshold_rows(data: Data) -> list[tuple[str, str, list[Stat | None], int]]:
    """(ablation, backbone, cells at each threshold and mPCK averaged over splits, number of splits); the
    mean-position floor last, with backbone ``""``."""
    out = []
    for ablation, backbone in combos(data):
        stats = [split_stats(values(data.finished, key, ablation, backbone))[1:] for key in metric_keys("test")]
        out.append((ablation, backbone, [s for s, _ in stats], stats[-1][1]))
    if not data.finished.empty:  # logged by every run on its test episodes: the mean over a split's runs
        cells, n = [], 0
        for key in metric_keys(FLOOR):
            per_split = data.finished.groupby("split")[key].mean().dropna() if key in data.finished else []
            n = len(per_split)
            cells.append(Stat(100.0 * per_split.mean(), math.nan) if n else None)
        out.append((FLOOR_LABEL, "", cells, n))
    return out


def threshold_table(data: Data) -> Table:
    rows = [[label, backbone_name(backbone) if backbone else DASH] + [fmt(c) for c in cells] + [str(n)]
            for label, backbone, cells, n in threshold_rows(data)]
    return _table("pck_thresholds", "PCK (%) at each threshold, mean over the splits present",
                  ["Ablation", "Backbone"] + [f"PCK@{t:g}" for t in THRESHOLDS] + ["mPCK", "Splits"],
                  rows or [[DASH, DASH] + [DASH] * (len(THRESHOLDS) + 1) + ["0"]],
                  [f"The {FLOOR_LABEL} predicts each keypoint name at its mean training position "
                   "(no image): the floor a model must beat."])


def latest_evals(evals: pd.DataFrame) -> pd.DataFrame:
    """One value per (variant, cell, training seed, noise seed): a repeated evaluation replaces the older."""
    return evals.drop_duplicates(["noise", "variant", "split", "ablation", "backbone", "seed"], keep="last")


def table4(data: Data, with_paper: bool, main: str) -> Table | None:
    """Class-prompt noise; with several class variants, one block of rows each, labelled by the variant."""
    evals = latest_evals(data.evals[data.evals.noise == CLASS_NOISE])
    variants = sorted(set(evals.variant))
    blocks = [setting_table("table4", f"{PAPER['table4']['title']}, backbone {backbone_name(main)}",
                            evals[evals.variant == v], "pck", with_paper, main,
                            "" if len(variants) == 1 else f" ({v})") for v in variants]
    if not blocks:
        return None
    partial = any(PARTIAL_NOTE in t.notes for t in blocks)
    return Table("table4", blocks[0].title, pd.concat([t.frame for t in blocks], ignore_index=True),
                 [PARTIAL_NOTE] if partial else [])


def describe(variant: str) -> tuple[tuple, str, str]:
    """A noise variant's place among the columns (clean, typo rates, the paper's templates, the reference
    texts, then any other by name), its label, and the paper's Table 5 column it compares with."""
    kind, _, name = variant.partition(":")
    rank = TEMPLATE_ORDER.index(name) if name in TEMPLATE_ORDER else len(TEMPLATE_ORDER)
    if variant == "clean":
        return (0, 0, variant), "clean prompts", variant
    if variant == "typo" or variant.startswith("typo@"):
        rate = f" (rate {variant.split('@', 1)[1]})" if "@" in variant else ""
        return (1, 0, variant), f"keypoint typo{rate}", "typo"
    if kind == "template" and name:
        a, _, b = name.partition("-")
        return (2, rank, variant), f"{a.replace('_', ' ')}→{b.replace('_', ' ')}" if b else name, name
    if kind == "reference" and name:
        return (3, rank, variant), f"reference texts: {name}", name
    return (4, 0, variant), variant, variant


def table5(data: Data, with_paper: bool, main: str) -> Table | None:
    """Every other noise variant of the main backbone, one column each: PCK@0.2 averaged over the splits."""
    evals = latest_evals(data.evals[(data.evals.noise != CLASS_NOISE) & (data.evals.backbone == main)])
    if evals.empty:
        return None
    variants = sorted(set(evals.variant), key=lambda v: describe(v)[0])
    rows, partial = [], False
    for ablation, label, paper in paper_rows("table5"):
        row = []
        for v in variants:
            _, avg, n = split_stats(values(evals[evals.variant == v], "pck", ablation, main))
            partial |= 0 < n < len(SPLITS)
            row.append(fmt(avg, "†" if 0 < n < len(SPLITS) else ""))
        rows.append([label] + (["ours"] if with_paper else []) + row)
        if with_paper:
            keys = [describe(v)[2] for v in variants]
            rows.append([label, PUBLISHED] + [f"{paper[k]:.2f}" if k in (paper or {}) else DASH for k in keys])
    notes = ["Each cell is the mean over the splits evaluated. " + PARTIAL_NOTE if partial else
             "Each cell is the mean over the five splits."] + ([PAPER["table5"]["note"]] if with_paper else [])
    return _table("table5", f"{PAPER['table5']['title']}, backbone {backbone_name(main)}",
                  ["Method"] + (["Source"] if with_paper else []) + [describe(v)[1] for v in variants], rows, notes)


def runs_csv(data: Data, folder: Path) -> Path:
    """Every finished run, one numeric row: the raw data of the tables."""
    keys = sorted(k for k in data.finished if k.startswith(("test/", f"{FLOOR}/", "val/")))
    frame = data.finished.rename(columns={"name": "run_name"})
    path = folder / "runs.csv"
    frame[["run_id", "run_name", "split", "ablation", "backbone", "seed"] + keys].to_csv(
        path, index=False, lineterminator="\r\n", encoding="utf-8")
    return path


# --- plots ------------------------------------------------------------------------------------------


def _means(stats: list[Stat | None]) -> tuple[list[float], list[float]]:
    return ([s.mean if s else math.nan for s in stats], [s.std if s else math.nan for s in stats])


def _splits(n: int) -> str:
    return f"{n} split{'s' * (n != 1)}"


def draw_plots(client, data: Data, out: Path, main: str, with_paper: bool) -> list[Path]:
    order = ablation_order()
    lines = [plots.Line(f"{a} ({backbone_name(b)}, {_splits(n)})" if b else f"{a} ({_splits(n)})",
                        a if b else "", b, *_means(stats)) for a, b, stats, n in threshold_rows(data)]
    paper_all = {a: v for t in ("table3", "table2") for a, _, v in paper_rows(t) if v}
    bars = []
    for a, b in combos(data):
        cells, avg, n = split_stats(values(data.finished, MAIN, a, b))
        if b == main and n:
            bars.append(plots.Bars(a, *_means(cells + [avg]), paper_all.get(a, ()) if with_paper else ()))
    curves = []
    for r in pd.concat([data.finished, data.unfinished], ignore_index=True).itertuples(index=False):
        loss, val = ([(m.step, m.value) for m in client.get_metric_history(r.run_id, k)] for k in CURVE_KEYS)
        curves.append(plots.Curve(r.split, r.ablation, r.backbone, f"{r.ablation} ({backbone_name(r.backbone)})",
                                  r.status == "FINISHED", loss, val))
    return [plots.plot_thresholds(out / "pck_vs_threshold.png", THRESHOLDS, lines, order),
            plots.plot_split_bars(out / "per_split_bars.png", SPLIT_COLUMNS, bars, order, main, backbone_name(main),
                                  PUBLISHED),
            plots.plot_curves(out / "curves.png", curves, order)]


# --- main -------------------------------------------------------------------------------------------


def main_backbone(data: Data, wanted: str | None) -> str:
    """``wanted``, else swinv2_t if it has finished runs (or nothing has), else the backbone with the most
    finished runs: a stale RUNNING run does not count."""
    if wanted:
        return wanted
    counts = data.finished.backbone.value_counts()
    if counts.empty or "swinv2_t" in counts.index:
        return "swinv2_t"
    return max(sorted(counts.index), key=lambda b: counts[b])


def build_tables(data: Data, with_paper: bool, main: str) -> list[Table]:
    tables = [
        table1(data, with_paper, main),
        *(setting_table(t, f"{PAPER[t]['title']} (PCK@0.2 %, backbone {backbone_name(main)})", data.finished,
                        MAIN, with_paper, main) for t in ("table2", "table3")),
        mpck_table(data),
        threshold_table(data),
    ]
    return tables + [t for t in (table4(data, with_paper, main), table5(data, with_paper, main)) if t is not None]


def report(args: argparse.Namespace) -> dict[str, Any]:
    uri = require_store(tracking_uri(args.tracking_uri))
    client = open_client(uri)
    print(f"reading experiment {args.experiment!r} from {uri}"
          f"{'' if args.parent_run is None else f' (children of {args.parent_run})'}", flush=True)
    data = load(client, uri, args.experiment, args.parent_run)
    main = main_backbone(data, args.backbone)
    replaced = (f" ({data.replaced} older run{'s' * (data.replaced != 1)} of the same cell ignored)"
                if data.replaced else "")
    print(f"{len(data.finished)} finished training runs{replaced}, {len(data.unfinished)} not finished (left out "
          f"of the tables), {len(data.evals)} evaluation runs; Tables 2-5 use backbone {main}", flush=True)
    out = args.out or Path("report") / args.experiment
    out.mkdir(parents=True, exist_ok=True)
    tables = build_tables(data, args.with_paper, main)
    head = [f"# Report: experiment `{args.experiment}`", "",
            f"{len(data.finished)} finished training runs"
            + (f" of sweep parent run `{args.parent_run}`" if args.parent_run else "") + replaced
            + f"; {len(data.unfinished)} not finished yet (not in the tables). Cells are test PCK in %, "
              f"mean ± std over seeds where there are several; {DASH} where no run has finished.", ""]
    if args.with_paper:
        head += [f"Rows labelled _{PUBLISHED}_ are the numbers the CapeNext paper reports (real MP-100, "
                 "pretrained backbones and CLIP ViT-B/32); they are not produced by this code.", ""]
    md = "\n".join(head) + "\n" + "\n".join(t.markdown() for t in tables)
    figures = draw_plots(client, data, out, main, args.with_paper)
    md += "\n### Plots\n\n" + "\n".join(f"![{p.stem}]({p.name})" for p in figures) + "\n"
    (out / "report.md").write_text(md, encoding="utf-8")
    files = [out / "report.md"] + [t.write_csv(out) for t in tables] + [runs_csv(data, out)] + figures
    print(md)
    print("wrote " + ", ".join(str(f) for f in files), flush=True)
    return {"out": out, "tables": tables, "files": files, "data": data}


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("MPLBACKEND", "Agg")
    report(parse_args(argv))
    return 0


if __name__ == "__main__":
    run_main(main)
