"""Paper-style tables and plots from MLflow: ``python -m jobs.report --experiment NAME``.

Reads the training runs of an experiment (or the children of one sweep's parent run, ``--parent-run``)
with ``mlflow.search_runs`` (a pandas DataFrame) and writes, under ``--out``:

* ``report.md`` with every table, and one CSV per table (the same cells): ``table1.csv`` (method ×
  backbone: CapeX = ablation ``baseline``, CapeNext = ``full``), ``table2.csv`` (module ablations),
  ``table3.csv`` (multimodal input), ``mpck.csv`` (mean of PCK@0.05-0.25 per split), ``pck_thresholds.csv``
  (PCK at every threshold next to the per-name mean-position floor, metrics ``floor/pck_*``), ``seeds.csv``
  (paired differences against ``full``, seed by seed), ``keypoint_types.csv`` (polysemous against unambiguous
  keypoints, when runs logged ``test/polysemous/*`` and ``test/unambiguous/*``), and, when evaluation runs
  exist (``capenext.kind=evaluation``), ``table4.csv`` (noise ``class``) and ``table5.csv`` (one column per
  other ``noise_variant``: ``typo@R``, ``template:NAME``, ``reference:NAME``, ``clean``, any other by its name);
* ``runs.csv``: one numeric row per finished run (the raw data behind the tables); ``cells.csv``: one numeric
  row per cell (n, mean, std and the 95 % interval of every test metric, per split and Avg);
* ``pck_vs_threshold.png``, ``per_split_bars.png``, ``curves.png``, ``seeds.png``, drawn by
  :mod:`jobs.reports.plots`.

Cells are test PCK@0.2 in % over the seeds of one (split, ablation, backbone[, text encoder]): "mean ± h
(n=N)" when there are N ≥ 2 seeds, h the half-width of the 95 % t-interval of the mean (Student's t with
N - 1 degrees of freedom), the value alone for one seed, "—" for none; of several finished runs of one seed,
the newest counts. Avg is the mean of the splits present, marked † when fewer than five are; with two seeds or
more that every split present has, it is the mean and interval of those seeds' means across the splits. Rows are keyed by the text encoder too (param
``model.text_encoder``; a run without it used CLIP) when the runs used more than one. Only FINISHED runs
enter the tables, so the report works while a sweep is still running. ``--with-paper`` adds the CapeNext
paper's published numbers (``paper_results.json``), each row labelled "paper (published)".
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, NamedTuple

import pandas as pd

from capenext.cli import UsageError, run_main
from capenext.data.mp100 import SPLITS
from capenext.metrics import FLOOR, GROUPS, THRESHOLDS, metric_keys, pck_key
from jobs.reports import plots
from jobs.runtime.tracking import find_run, open_client, require_store, tracking_uri

DASH = "—"
PUBLISHED = "paper (published)"
FLOOR_LABEL = "mean-position floor"
MAIN = f"test/{pck_key(0.2)}"
MPCK = metric_keys("test", thresholds=())[0]  # test/pck_mean
CURVE_KEYS = ("train/loss", f"val/{pck_key(0.2)}")
PAPER = json.loads(resources.files("jobs.reports").joinpath("paper_results.json").read_text(encoding="utf-8"))
BACKBONE_NAMES = {**PAPER["backbones"], "tiny": "tiny (tests)"}  # the paper's names, in its Table 1 order
METHODS = tuple(PAPER["methods"].items())  # Table 1: (ablation, method)
CLASS_NOISE = "class"  # the noise of Table 4 (per query, as the reference); every other variant is a Table 5 column
SPLIT_COLUMNS = [f"Split{k}" for k in SPLITS] + ["Avg"]
PARTIAL_NOTE = "† mean over the splits present (fewer than five)."
LABEL_COLUMNS = {"Method", "Backbone", "Source", "Setting", "Ablation", "Text encoder", "Metric", "Split"}
ENCODER_PARAM = "model.text_encoder"  # the training run's param (ModelCfg.text_encoder) naming its text encoder
DEFAULT_ENCODER = "clip"  # a run without the param used CLIP's text tower
ENCODER_COLUMN = "Text encoder"
REFERENCE = "full"  # the ablation every other is paired with, seed by seed
# keypoint types a data set may mark; evaluation logs test/<type>/pck_* (and .../keypoints) for each
KEYPOINT_GROUPS = GROUPS  # capenext.metrics: the keypoint types a data set may mark
CELL = ["split", "ablation", "backbone", "encoder", "seed"]  # one finished training run counts per cell
UNKNOWN_SEED = "?"  # a run without a seed tag: in the cells, never paired
CI_NOTE = ("± is the half-width of the 95 % t-interval of the mean over n seeds (Student's t, n − 1 degrees "
           "of freedom); a value without ± comes from one seed.")
AVG_NOTE = ("An Avg with ± is the mean and interval of each seed's mean across the splits present, over the seeds "
            "all of them have; without ±, the mean of the split cells.")


def group_key(group: str, name: str = pck_key(0.2)) -> str:
    """The test metric of one keypoint type: ``test/polysemous/pck_0.2``, ``test/unambiguous/keypoints``."""
    return f"test/{group}/{name}"


def paper_rows(table: str) -> list[tuple[str, str, Any]]:
    """(ablation, row label, published values or None) of the paper's Table 2, 3, 4 or 5."""
    return [(r["ablation"], r["label"], r["published"]) for r in PAPER[table]["rows"]]


def ablation_order() -> list[str]:
    """The paper's seven ablations in its order, then every other registered one."""
    # the model registry imports timm: only when needed
    from capenext.models import available_ablations

    return PAPER["ablation_order"] + [a for a in available_ablations() if a not in PAPER["ablation_order"]]


def backbone_name(backbone: str) -> str:
    return BACKBONE_NAMES.get(backbone, backbone)


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
    """``finished``/``unfinished`` training runs: ``run_id``, ``name``, ``split``, ``ablation``, ``backbone``,
    ``encoder`` (the text encoder), ``seed``, ``status``, ``end_time`` and one column per metric. ``evals``:
    finished evaluation runs, ``run_id``, ``noise``, ``variant``, the cell of the training run evaluated,
    ``seed`` (``<training seed>:<noise seed>``) and ``pck`` (PCK@0.2), oldest first."""

    finished: pd.DataFrame
    unfinished: pd.DataFrame
    evals: pd.DataFrame
    replaced: int = 0  # finished runs that a newer finished run of the same cell replaced


def search(uri: str, experiment_id: str, query: str) -> pd.DataFrame:
    """``mlflow.search_runs`` (it pages by itself) on ``uri``: it reads the process-wide tracking URI, so
    that is set for the search and put back after it."""
    import mlflow

    before = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    try:
        return mlflow.search_runs(experiment_ids=[experiment_id], filter_string=query, output_format="pandas")
    finally:
        mlflow.set_tracking_uri(before)  # None unsets it again


def _column(frame: pd.DataFrame, name: str) -> pd.Series:
    """A column with "" as missing; all missing when no run has it (``search_runs`` then leaves it out)."""
    if name in frame:
        return frame[name].where(frame[name] != "")
    return pd.Series(None, index=frame.index, dtype=object)


def _cells(raw: pd.DataFrame) -> pd.DataFrame:
    """``split`` (int), ``ablation``, ``backbone``, ``seed`` from the tags and ``encoder`` from the param
    :data:`ENCODER_PARAM` (CLIP without it); rows without a whole-number split, an ablation or a backbone are
    dropped."""
    split = pd.to_numeric(_column(raw, "tags.split"), errors="coerce")
    out = pd.DataFrame({"split": split, "ablation": _column(raw, "tags.ablation"),
                        "backbone": _column(raw, "tags.backbone"),
                        "encoder": _column(raw, f"params.{ENCODER_PARAM}").fillna(DEFAULT_ENCODER),
                        "seed": _column(raw, "tags.seed").fillna(UNKNOWN_SEED)})
    out = out[(split % 1 == 0) & out.ablation.notna() & out.backbone.notna()]
    return out.astype({"split": int, "ablation": str, "backbone": str, "encoder": str, "seed": str})


def _metrics(raw: pd.DataFrame) -> pd.DataFrame:
    """The ``metrics.*`` columns without the prefix."""
    return raw[[c for c in raw if c.startswith("metrics.")]].rename(columns=lambda c: c[len("metrics."):])


def training_frame(raw: pd.DataFrame) -> pd.DataFrame:
    """One row per training run of a ``search_runs`` frame (sweep parents and evaluations left out)."""
    raw = raw[~_column(raw, "tags.capenext.kind").isin(["sweep", "evaluation"])]
    cells = _cells(raw)
    raw = raw.loc[cells.index]
    name = _column(raw, "tags.capenext.run_name").fillna(_column(raw, "tags.mlflow.runName")).fillna(raw.run_id)
    recipe = _column(raw, "tags.recipe").fillna("?").rename("recipe")
    departures = _column(raw, "tags.paper_departures").fillna("not recorded").rename("paper_departures")
    return pd.concat([raw.run_id, name.rename("name"), cells, recipe, departures, raw[["status", "end_time"]],
                      _metrics(raw)], axis=1)


def evaluation_frame(client, raw: pd.DataFrame, trained: pd.DataFrame, parent: str | None) -> pd.DataFrame:
    """The finished evaluation runs with the cell of the training run each evaluated: one of ``trained``;
    with ``parent``, no other (the run is outside the sweep); else the training run as the store has it,
    else the evaluation run's own tags."""
    raw = raw[raw.status == "FINISHED"].sort_values("start_time", kind="stable")
    metrics = _metrics(raw)
    found = [k for k in ("test/pck_0.2",) if k in metrics]
    noise = _column(raw, "tags.noise").fillna("")
    ev = pd.DataFrame({"run_id": raw.run_id, "noise": noise, "variant": _column(raw, "tags.noise_variant")
                       .fillna(noise), "pck": metrics[found].bfill(axis=1).iloc[:, 0] if found else math.nan,
                       "training_run_id": _column(raw, "tags.training_run_id").fillna(""),
                       "noise_seed": _column(raw, "params.noise_seed").fillna(raw.run_id)}, index=raw.index)
    ev = ev[(ev.variant != "") & ev.pck.notna()]
    known = trained.set_index("run_id")[CELL]
    if parent is None:  # training runs of other experiments, as the store has them
        outside = [find_run(client, i) for i in set(ev.training_run_id) - set(known.index) - {""}]
        outside = [r for r in outside if r is not None]
        tags = pd.DataFrame([{**{f"tags.{k}": v for k, v in r.data.tags.items()},
                              **{f"params.{k}": v for k, v in r.data.params.items()}} for r in outside],
                            index=[r.info.run_id for r in outside])
        known = pd.concat([known, _cells(tags)]) if len(tags) else known
    cell = known.reindex(ev.training_run_id).set_axis(ev.index)
    if parent is None:
        cell = cell.fillna(_cells(raw).reindex(ev.index))
    ev = pd.concat([ev, cell], axis=1).dropna(subset=["split", "ablation"]).astype({"split": int})
    ev["seed"] = ev.seed.astype(str) + ":" + ev.noise_seed.astype(str)
    return ev[["run_id", "noise", "variant"] + CELL + ["pck"]].reset_index(drop=True)


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
    # the newest finished run per (split, ablation, backbone, encoder, seed): a re-run replaces an older one
    finished = (runs[done].sort_values("end_time", kind="stable", na_position="first")
                .drop_duplicates(CELL, keep="last").sort_values(["backbone", "ablation", "encoder", "split", "seed"]))
    evals = evaluation_frame(client, search(uri, exp.experiment_id, "tags.`capenext.kind` = 'evaluation'"),
                             runs, parent)
    return Data(finished.reset_index(drop=True), runs[~done].reset_index(drop=True), evals,
                int(done.sum()) - len(finished))


# --- cells: mean and 95 % t-interval over seeds ----------------------------------------------------


@functools.cache
def t975(df: int) -> float:
    """The 0.975 quantile of Student's t with ``df`` degrees of freedom (scipy comes with mlflow): the
    two-sided 95 % interval's multiplier, 12.706 for df 1, 4.303 for df 2, 1.960 in the limit."""
    from scipy.stats import t

    return float(t.ppf(0.975, df))


class Stat(NamedTuple):
    """A cell in %: the mean, the sample std (NaN with one value) and the number of seeds n behind them."""

    mean: float
    std: float
    n: int

    @property
    def half(self) -> float:
        """Half-width of the 95 % t-interval of the mean: t(0.975, n - 1) · std / √n; NaN when n < 2."""
        if self.n < 2 or math.isnan(self.std):
            return math.nan
        return t975(self.n - 1) * self.std / math.sqrt(self.n)

    def excludes_zero(self) -> bool | None:
        """Whether the 95 % interval lies wholly above or below 0 (None: no interval, one seed)."""
        if math.isnan(self.half):
            return None
        return abs(self.mean) > self.half


def summarize(values) -> Stat | None:
    """Mean, sample std and count of the values that are not NaN (None when there are none)."""
    vals = pd.Series(values, dtype=float).dropna()
    if vals.empty:
        return None
    return Stat(float(vals.mean()), float(vals.std()) if len(vals) > 1 else math.nan, len(vals))


def fmt(stat: Stat | None, mark: str = "") -> str:
    """``45.12``, ``45.12 ± 12.71 (n=2)`` (± the 95 % t-interval's half-width over n seeds), or ``—``."""
    if stat is None:
        return DASH
    if math.isnan(stat.half):
        return f"{stat.mean:.2f}{mark}"
    return f"{stat.mean:.2f} ± {stat.half:.2f} (n={stat.n}){mark}"


def _select(frame: pd.DataFrame, backbone: str, encoder: str | None, ablation: str | None = None) -> pd.DataFrame:
    """The rows of one backbone (and text encoder, and ablation, when given) on a known split."""
    keep = (frame.backbone == backbone) & frame.split.isin(SPLITS)
    if encoder is not None:
        keep &= frame.encoder == encoder
    if ablation is not None:
        keep &= frame.ablation == ablation
    return frame[keep]


def stats(frame: pd.DataFrame, metric: str, ablation: str, backbone: str, encoder: str | None = None
          ) -> tuple[list, Stat | None, int]:
    """Split1..Split5 cells of ``metric`` × 100 over seeds for one (ablation, backbone[, encoder]), their
    average and how many splits it covers. The average's interval is over the seeds that every present split
    has (each seed's own mean over the splits), so it shows seed noise, not split difficulty."""
    sel = _select(frame, backbone, encoder, ablation)
    sel = sel.dropna(subset=[metric]) if metric in frame else sel.iloc[:0]
    if sel.empty:
        return [None] * len(SPLITS), None, 0
    vals = pd.DataFrame({"split": sel.split, "seed": sel.seed, "value": 100.0 * sel[metric]})
    cells = [summarize(vals.value[vals.split == k]) for k in SPLITS]
    present = [c for c in cells if c is not None]
    common = vals.pivot_table(index="seed", columns="split", values="value", aggfunc="last").dropna()
    if len(common) >= 2:
        return cells, summarize(common.mean(axis=1)), len(present)
    return cells, Stat(sum(c.mean for c in present) / len(present), math.nan, len(common)), len(present)


def _paired(a: pd.DataFrame, b: pd.DataFrame, metric: str) -> dict[str, Stat]:
    """Per split (``Split1``..) and ``Avg``, the per-seed differences ``a - b`` of ``metric`` × 100: pairs are
    matched by seed, only seeds both have count (a run without a seed tag never does). Avg (with two splits or
    more): per seed, the mean difference over the splits with pairs, for the seeds paired on every one."""
    if metric not in a or metric not in b:
        return {}
    grids = [g[(g.seed != UNKNOWN_SEED) & g[metric].notna()].pivot_table(index="seed", columns="split",
                                                                         values=metric, aggfunc="last")
             for g in (a, b)]
    if any(g.empty for g in grids):
        return {}
    diff = 100.0 * (grids[0] - grids[1])  # (seeds, splits) aligned on both; NaN where either has no run
    splits = [k for k in sorted(diff.columns) if diff[k].notna().any()]
    out = {f"Split{k}": summarize(diff[k]) for k in splits}
    common = diff[splits].dropna()
    if len(splits) > 1 and len(common):
        out["Avg"] = summarize(common.mean(axis=1))
    return out


def paired_differences(frame: pd.DataFrame, metric: str, ablation: str, backbone: str, encoder: str | None = None,
                       reference: str = REFERENCE) -> dict[str, Stat]:
    """:func:`_paired` of ``ablation - reference`` on one backbone (and text encoder)."""
    return _paired(_select(frame, backbone, encoder, ablation), _select(frame, backbone, encoder, reference), metric)


def encoder_differences(frame: pd.DataFrame, metric: str, ablation: str, backbone: str, encoder: str
                        ) -> dict[str, Stat]:
    """:func:`_paired` of ``encoder - clip`` for one ablation and backbone: what the text encoder changes."""
    return _paired(_select(frame, backbone, encoder, ablation), _select(frame, backbone, DEFAULT_ENCODER, ablation),
                   metric)


def split_row(frame: pd.DataFrame, metric: str, ablation: str, backbone: str, encoder: str | None = None
              ) -> tuple[list[str], bool]:
    """Split1..Split5 and Avg cells of one row; whether Avg covers fewer than five splits."""
    cells, avg, n = stats(frame, metric, ablation, backbone, encoder)
    partial = 0 < n < len(SPLITS)
    return [fmt(c) for c in cells] + [fmt(avg, "†" if partial else "")], partial


def published(vals) -> list[str]:
    return [f"{v:.2f}" for v in vals] if vals else [DASH] * (len(SPLITS) + 1)


def encoder_rows(data: Data) -> list[str | None]:
    """The text encoders that key the rows, CLIP first, when the finished runs used several; else ``[None]``
    (one encoder: no column, no filter)."""
    found = sorted(set(data.finished.encoder), key=lambda e: (e != DEFAULT_ENCODER, e))
    return found if len(found) > 1 else [None]


def _encoder(encoders: list[str | None], value: str | None = ENCODER_COLUMN) -> list[str]:
    """The Text encoder column (or a row's value in it) when rows are keyed by encoder."""
    return [] if encoders == [None] else [str(value)]


def row_label(ablation: str, encoder: str | None) -> str:
    """``full``, or ``full [wordllama]`` when rows are keyed by encoder (legends)."""
    return ablation if encoder is None else f"{ablation} [{encoder}]"


def combos(data: Data) -> list[tuple[str, str, str | None]]:
    """The (ablation, backbone, encoder) triples with finished runs (encoder None with one encoder), by
    backbone, then in the ablation order, then CLIP before the other encoders."""
    order = {a: i for i, a in enumerate(ablation_order())}
    keyed = encoder_rows(data) != [None]
    fin = data.finished
    have = set(zip(fin.ablation, fin.backbone, fin.encoder if keyed else [None] * len(fin)))
    return sorted(have, key=lambda c: (c[1], order.get(c[0], len(order)), c[0], c[2] != DEFAULT_ENCODER, c[2] or ""))


# --- tables -----------------------------------------------------------------------------------------


@dataclass
class Table:
    """One table: its cells as text, written as Markdown (title, cells, notes) and as CSV (the cells). A table
    with an interval among its cells gets the note saying what the ± is."""

    name: str  # file stem
    title: str
    frame: pd.DataFrame  # the cells, as text
    notes: list[str] = field(default_factory=list)

    def __post_init__(self):
        if any("±" in str(c) for row in self.frame.itertuples(index=False) for c in row):
            extra = [CI_NOTE] + ([AVG_NOTE] if any(str(c).startswith("Avg") for c in self.frame.columns) else [])
            self.notes = self.notes + [n for n in extra if n not in self.notes]

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
        self.frame.to_csv(path, index=False, lineterminator="\r\n")  # line ends as the csv module writes
        return path


def _table(name: str, title: str, columns: list[str], rows: list[list[str]], notes: list[str]) -> Table:
    return Table(name, title, pd.DataFrame(rows, columns=columns), notes)


def _source(with_paper: bool, value: str = "Source") -> list[str]:
    """The Source column (or a row's value in it) when published rows are shown."""
    return [value] if with_paper else []


def table1(data: Data, with_paper: bool, main: str) -> Table:
    """Method × backbone (× text encoder), each followed by its published row (the paper used CLIP)."""
    have = set(zip(data.finished.ablation, data.finished.backbone))
    backbones = [b for b in PAPER["backbones"] if any((a, b) in have for a, _ in METHODS)]
    backbones += sorted({b for a, b in have if a in dict(METHODS) and b not in backbones})
    paper = [(r[0], r[1], r[3:]) for r in PAPER["table1"]["rows"]]  # method, backbone, Split1..5 and Avg
    encoders = encoder_rows(data)
    published_row = _encoder(encoders, DEFAULT_ENCODER) + [PUBLISHED]
    rows, partial, shown = [], False, set()
    for ablation, method in METHODS:
        for b in backbones or [main]:
            for enc in encoders:
                cells, part = split_row(data.finished, MAIN, ablation, b, enc)
                partial |= part
                rows.append([method, backbone_name(b)] + _encoder(encoders, enc) + _source(with_paper, "ours") + cells)
            match = [v for m, bb, v in paper if (m, bb) == (method, backbone_name(b))]
            if with_paper and match:
                rows.append([method, backbone_name(b)] + published_row + published(match[0]))
                shown.add((method, backbone_name(b)))
    rows += [[m, bb] + published_row + published(v) for m, bb, v in paper if with_paper and (m, bb) not in shown]
    columns = ["Method", "Backbone"] + _encoder(encoders) + _source(with_paper) + SPLIT_COLUMNS
    return _table("table1", PAPER["table1"]["title"], columns, rows, [PARTIAL_NOTE] if partial else [])


def setting_table(name: str, title: str, frame: pd.DataFrame, metric: str, with_paper: bool, main: str,
                  suffix: str = "", encoders: list[str | None] | None = None) -> Table:
    """The rows of the paper's table ``name`` (labels + ``suffix``) on the main backbone, one per text encoder
    when ``encoders`` are several, each label followed by its published row."""
    encoders = encoders or [None]
    rows, partial = [], False
    for ablation, label, paper in paper_rows(name):
        for enc in encoders:
            cells, part = split_row(frame, metric, ablation, main, enc)
            partial |= part
            rows.append([label + suffix] + _encoder(encoders, enc) + _source(with_paper, "ours") + cells)
        if with_paper:
            rows.append([label + suffix] + _encoder(encoders, DEFAULT_ENCODER) + [PUBLISHED] + published(paper))
    notes = [PARTIAL_NOTE] if partial else []
    if with_paper and any(paper is None for *_, paper in paper_rows(name)):
        notes.append(f"{DASH} in a published row: the paper reports no such setting.")
    columns = ["Setting"] + _encoder(encoders) + _source(with_paper) + SPLIT_COLUMNS
    return _table(name, title, columns, rows, notes)


def mpck_table(data: Data) -> Table:
    rows, partial = [], False
    encoders = encoder_rows(data)
    for ablation, backbone, enc in combos(data):
        cells, part = split_row(data.finished, MPCK, ablation, backbone, enc)
        partial |= part
        rows.append([ablation, backbone_name(backbone)] + _encoder(encoders, enc) + cells)
    columns = ["Ablation", "Backbone"] + _encoder(encoders) + SPLIT_COLUMNS
    return _table("mpck", "mPCK (%): the mean of PCK@0.05, 0.1, 0.15, 0.2 and 0.25, per split", columns,
                  rows or [[DASH] * len(columns)], [PARTIAL_NOTE] if partial else [])


def threshold_rows(data: Data) -> list[tuple[str, str, str | None, list[Stat | None], int]]:
    """(ablation, backbone, encoder, cells at each threshold and mPCK averaged over splits, number of splits);
    the mean-position floor last, with backbone ``""`` and encoder None: per split the mean over its runs,
    then over splits."""
    out = []
    for ablation, backbone, enc in combos(data):
        avgs = [stats(data.finished, key, ablation, backbone, enc)[1:] for key in metric_keys("test")]
        out.append((ablation, backbone, enc, [s for s, _ in avgs], avgs[-1][1]))
    if not data.finished.empty:
        keys = metric_keys(FLOOR)
        per_split = data.finished.reindex(columns=["split"] + keys).groupby("split")[keys].mean()
        cells = [Stat(100.0 * per_split[k].mean(), math.nan, 1) if per_split[k].notna().any() else None
                 for k in keys]
        out.append((FLOOR_LABEL, "", None, cells, int(per_split[keys[-1]].notna().sum())))
    return out


def threshold_table(data: Data) -> Table:
    encoders = encoder_rows(data)
    rows = [[label, backbone_name(backbone) if backbone else DASH] + _encoder(encoders, enc or DASH)
            + [fmt(c) for c in cells] + [str(n)] for label, backbone, enc, cells, n in threshold_rows(data)]
    columns = ["Ablation", "Backbone"] + _encoder(encoders) + [f"PCK@{t:g}" for t in THRESHOLDS] + ["mPCK", "Splits"]
    notes = [(f"The {FLOOR_LABEL} predicts each keypoint name at its mean training position (no image): the floor "
              "a model must beat.")]
    if any("±" in cell for row in rows for cell in row):
        notes.append("Each cell is the mean over the splits present; its interval is over each seed's mean across "
                     "them, for the seeds all of them have.")
    return _table("pck_thresholds", "PCK (%) at each threshold, mean over the splits present", columns,
                  rows or [[DASH] * (len(columns) - 1) + ["0"]], notes)


def latest_evals(evals: pd.DataFrame) -> pd.DataFrame:
    """One value per (variant, cell, training seed, noise seed): a repeated evaluation replaces the older."""
    return evals.drop_duplicates(["noise", "variant"] + CELL, keep="last")


def table4(data: Data, with_paper: bool, main: str) -> Table | None:
    """Class-prompt noise; with several class variants, one block of rows each, labelled by the variant."""
    evals = latest_evals(data.evals[data.evals.noise == CLASS_NOISE])
    variants = sorted(set(evals.variant))
    blocks = [setting_table("table4", f"{PAPER['table4']['title']}, backbone {backbone_name(main)}",
                            evals[evals.variant == v], "pck", with_paper, main,
                            "" if len(variants) == 1 else f" ({v})", encoder_rows(data)) for v in variants]
    if not blocks:
        return None
    partial = any(PARTIAL_NOTE in t.notes for t in blocks)
    return Table("table4", blocks[0].title, pd.concat([t.frame for t in blocks], ignore_index=True),
                 [PARTIAL_NOTE] if partial else [])


# the reference's own text variants that are the paper's Table 5 columns (its utils.py: typo_test, and the
# manual_modification* functions, each a plain substring swap on categories without hand-written texts)
EXACT_TABLE5 = {"reference:typo": "typo", "reference:manual": "paw-foreleg", "reference:manual_paw": "paw-foot",
                "reference:manual_eye": "eye-eyeball", "reference:manual_elbow": "elbow-forearm",
                "reference:manual_shoulder": "shoulder-upper_arm"}
APPROX = "≈"  # marks a column that approximates a paper column and is not set against it


def describe(variant: str) -> tuple[tuple, str, str | None]:
    """A noise variant's place among Table 5's columns (clean, typo rates, the paper's templates, the
    reference texts, then any other by name), its label, and the published column it is set against: only
    the reference's own variants are (:data:`EXACT_TABLE5`); our approximations (a typo rate, a template
    rewriting every text) are labelled as such and compared with nothing."""
    kind, _, name = variant.partition(":")
    order = PAPER["template_order"]
    exact = EXACT_TABLE5.get(variant)
    if variant == "clean":
        return (0, 0, variant), "clean prompts", None
    if variant == "typo" or variant.startswith("typo@"):
        rate = f" (rate {variant[5:]})" if "@" in variant else ""
        return (1, 0, variant), f"{APPROX} keypoint typo{rate}", None
    if kind == "template" and name:
        a, _, b = name.partition("-")
        label = f"{a.replace('_', ' ')}→{b.replace('_', ' ')}" if b else name
        return (2, order.index(name) if name in order else len(order), variant), f"{APPROX} {label} (every text)", None
    if variant == "class_per_category":
        return (4, 0, variant), f"{APPROX} wrong class per category", None
    if kind == "reference" and name:
        rank = order.index(exact) if exact in order else len(order)
        return (3, rank, variant), f"reference texts: {name}", exact
    return (5, 0, variant), variant, None


def table5(data: Data, with_paper: bool, main: str) -> Table | None:
    """Every other noise variant on the main backbone, one column each, averaged over the splits."""
    evals = latest_evals(data.evals[(data.evals.noise != CLASS_NOISE) & (data.evals.backbone == main)])
    if evals.empty:
        return None
    variants = sorted(set(evals.variant), key=lambda v: describe(v)[0])
    encoders = encoder_rows(data)
    rows, partial = [], False
    for ablation, label, paper in paper_rows("table5"):
        for enc in encoders:
            row = []
            for v in variants:
                _, avg, n = stats(evals[evals.variant == v], "pck", ablation, main, enc)
                partial |= 0 < n < len(SPLITS)
                row.append(fmt(avg, "†" if 0 < n < len(SPLITS) else ""))
            rows.append([label] + _encoder(encoders, enc) + _source(with_paper, "ours") + row)
        if with_paper:
            keys = [describe(v)[2] for v in variants]
            rows.append([label] + _encoder(encoders, DEFAULT_ENCODER) + [PUBLISHED]
                        + [f"{paper[k]:.2f}" if k in (paper or {}) else DASH for k in keys])
    notes = ["Each cell is the mean over the splits evaluated. " + PARTIAL_NOTE if partial else
             "Each cell is the mean over the five splits."] + ([PAPER["table5"]["note"]] if with_paper else [])
    if any(describe(v)[1].startswith(APPROX) for v in variants):
        notes.append(f"{APPROX}: our approximation of a paper column (a typo rate, a template rewriting every text), "
                     "not the reference's texts: not set against the paper's numbers.")
    columns = ["Method"] + _encoder(encoders) + _source(with_paper) + [describe(v)[1] for v in variants]
    return _table("table5", f"{PAPER['table5']['title']}, backbone {backbone_name(main)}", columns, rows, notes)


def keypoint_groups(data: Data) -> list[str]:
    """The keypoint types (:data:`KEYPOINT_GROUPS`) some finished run logged test PCK@0.2 for (none on MP-100)."""
    fin = data.finished
    return [g for g in KEYPOINT_GROUPS if group_key(g) in fin and fin[group_key(g)].notna().any()]


def _keypoint_counts(data: Data, groups: list[str], splits: list[int]) -> str:
    """``split 1: 40 polysemous, 160 unambiguous; ...`` from ``test/<type>/keypoints`` (mean over the runs)."""
    fin, parts = data.finished, []
    for k in splits:
        here = fin[fin.split == k]
        found = [f"{here[group_key(g, 'keypoints')].mean():.0f} {g}" for g in groups
                 if group_key(g, "keypoints") in here and here[group_key(g, "keypoints")].notna().any()]
        if found:
            parts.append(f"split {k}: " + ", ".join(found))
    return "; ".join(parts)


def keypoint_table(data: Data) -> Table | None:
    """Test PCK@0.2 over the polysemous and over the unambiguous keypoints, per split that has them and Avg,
    one row per (ablation, backbone[, text encoder]); None when no run logged them."""
    groups = keypoint_groups(data)
    if not groups:
        return None
    fin, encoders = data.finished, encoder_rows(data)
    has = fin[[group_key(g) for g in groups]].notna().any(axis=1)
    splits = sorted(int(k) for k in set(fin.split[has]) & set(SPLITS))
    rows, partial = [], False
    for ablation, backbone, enc in combos(data):
        per = {g: stats(fin, group_key(g), ablation, backbone, enc) for g in groups}
        row = [fmt(per[g][0][SPLITS.index(k)]) for k in splits for g in groups]
        if len(splits) > 1:
            marks = {g: "†" if 0 < per[g][2] < len(SPLITS) else "" for g in groups}
            partial |= any(marks.values())
            row += [fmt(per[g][1], marks[g]) for g in groups]
        rows.append([ablation, backbone_name(backbone)] + _encoder(encoders, enc) + row)
    columns = (["Ablation", "Backbone"] + _encoder(encoders) + [f"Split{k} {g}" for k in splits for g in groups]
               + ([f"Avg {g}" for g in groups] if len(splits) > 1 else []))
    notes = ["Polysemous: the keypoints the data set marks as naming another part in another supercategory (a "
             "chair's leg and a horse's); unambiguous: the others. Keypoints per test run: "
             + (_keypoint_counts(data, groups, splits) or "not logged") + "."]
    return _table("keypoint_types", "Polysemous vs unambiguous keypoints (test PCK@0.2 %)", columns, rows,
                  notes + ([PARTIAL_NOTE] if partial else []))


def difference_metrics(data: Data) -> list[tuple[str, str]]:
    """(label, metric) of the paired differences: test PCK@0.2, then over each keypoint type logged."""
    return [("PCK@0.2", MAIN)] + [(f"PCK@0.2 {g}", group_key(g)) for g in keypoint_groups(data)]


def difference_cells(stat: Stat) -> list[str]:
    """A signed difference ``-3.20 ± 1.10``, its interval ``[-4.30, -2.10]``, n, and whether the interval
    excludes 0 (``yes``/``no``; one seed: the value alone and ``—``)."""
    if math.isnan(stat.half):
        return [f"{stat.mean:+.2f}", DASH, str(stat.n), DASH]
    low, high = stat.mean - stat.half, stat.mean + stat.half
    return [f"{stat.mean:+.2f} ± {stat.half:.2f}", f"[{low:+.2f}, {high:+.2f}]", str(stat.n),
            "yes" if stat.excludes_zero() else "no"]


def seeds_table(data: Data) -> Table:
    """Paired differences ``ablation - full`` per (ablation, backbone[, text encoder], metric, split and Avg)."""
    encoders = encoder_rows(data)
    rows = []
    for ablation, backbone, enc in combos(data):
        if ablation == REFERENCE:
            continue
        for label, metric in difference_metrics(data):
            for where, stat in paired_differences(data.finished, metric, ablation, backbone, enc).items():
                rows.append([ablation, backbone_name(backbone)] + _encoder(encoders, enc) + [label, where]
                            + difference_cells(stat))
    columns = (["Ablation", "Backbone"] + _encoder(encoders)
               + ["Metric", "Split", "Difference (pp)", "95% interval", "n", "Excludes 0"])
    keyed = "backbone and text encoder" if encoders != [None] else "backbone"
    notes = [(f"Per seed, the ablation's test PCK minus {REFERENCE}'s on the same split and {keyed}, in percentage "
              "points; only the seeds both have count. Avg: per seed, the mean difference over the splits with "
              "pairs, for the seeds paired on all of them. Excludes 0: the 95 % interval lies wholly above or "
              f"below 0 ({DASH} with one seed: no interval).")]
    if not rows:
        notes.append(f"No pairs yet: they need finished runs of {REFERENCE} and of another ablation with a seed in "
                     "common (python -m jobs.sweep --seeds 0,1,2).")
    return _table("seeds", f"Paired differences vs {REFERENCE} (ablation − {REFERENCE}, seed by seed)", columns,
                  rows or [[DASH] * len(columns)], notes)


def encoders_table(data: Data) -> Table | None:
    """Paired differences ``encoder - clip`` per (ablation, backbone, encoder, metric, split and Avg), when the
    runs used a text encoder besides CLIP's; else None."""
    encoders = [e for e in encoder_rows(data) if e not in (None, DEFAULT_ENCODER)]
    if not encoders or DEFAULT_ENCODER not in set(data.finished.encoder):
        return None
    rows = []
    for ablation, backbone in dict.fromkeys((a, b) for a, b, _ in combos(data)):
        for enc in encoders:
            for label, metric in difference_metrics(data):
                for where, stat in encoder_differences(data.finished, metric, ablation, backbone, enc).items():
                    rows.append([ablation, backbone_name(backbone), f"{enc} − {DEFAULT_ENCODER}", label, where]
                                + difference_cells(stat))
    columns = ["Ablation", "Backbone", ENCODER_COLUMN, "Metric", "Split", "Difference (pp)", "95% interval", "n",
               "Excludes 0"]
    notes = [f"Per seed, the run's test PCK with the text encoder minus the same ablation's with {DEFAULT_ENCODER} on "
             "the same split and backbone, in percentage points; only the seeds both have count."]
    return _table("encoders", f"Paired differences vs {DEFAULT_ENCODER} (text encoder − {DEFAULT_ENCODER}, seed by "
                  "seed)", columns, rows or [[DASH] * len(columns)], notes)


def build_tables(data: Data, with_paper: bool, main: str) -> list[Table]:
    tables = [table1(data, with_paper, main)]
    tables += [setting_table(t, f"{PAPER[t]['title']} (PCK@0.2 %, backbone {backbone_name(main)})",
                             data.finished, MAIN, with_paper, main, encoders=encoder_rows(data))
               for t in ("table2", "table3")]
    tables += [mpck_table(data), threshold_table(data), seeds_table(data)]
    optional = (encoders_table(data), keypoint_table(data), table4(data, with_paper, main),
                table5(data, with_paper, main))
    return tables + [t for t in optional if t is not None]


def runs_csv(data: Data, folder: Path) -> Path:
    """Every finished run, one numeric row: the raw data of the tables."""
    keys = sorted(k for k in data.finished if k.startswith(("test/", f"{FLOOR}/", "val/")))
    path = folder / "runs.csv"
    data.finished.rename(columns={"name": "run_name", "encoder": "text_encoder"})[
        ["run_id", "run_name", "split", "ablation", "backbone", "text_encoder", "seed", "recipe", "paper_departures"]
        + keys].to_csv(path, index=False, lineterminator="\r\n")
    return path


CELLS_COLUMNS = ["backbone", "text_encoder", "ablation", "metric", "split", "n", "mean", "std", "ci95_half",
                 "ci95_low", "ci95_high"]


def cells_csv(data: Data, folder: Path) -> Path:
    """One numeric row per cell (in %): backbone, text encoder, ablation, test metric (every threshold and the
    mean, per keypoint type too), split (1-5, or ``avg``), n seeds, mean, sample std and the 95 % t-interval."""
    metrics = metric_keys("test") + [group_key(g, name) for g in keypoint_groups(data) for name in metric_keys()]
    single = ", ".join(sorted(set(data.finished.encoder)))
    rows = []
    for ablation, backbone, enc in combos(data):
        for metric in metrics:
            cells, avg, _ = stats(data.finished, metric, ablation, backbone, enc)
            for where, st in [*zip(map(str, SPLITS), cells), ("avg", avg)]:
                if st is not None:
                    rows.append([backbone, enc or single, ablation, metric, where, st.n, st.mean, st.std, st.half,
                                 st.mean - st.half, st.mean + st.half])
    path = folder / "cells.csv"
    pd.DataFrame(rows, columns=CELLS_COLUMNS).to_csv(path, index=False, float_format="%.4f", lineterminator="\r\n")
    return path


def departures_section(data: Data) -> str:
    """How far the runs behind each row are from the paper: per (ablation, backbone[, text encoder]), the recipe
    and every distinct list of departures its finished runs recorded (``paper_departures`` tags)."""
    keyed = encoder_rows(data) != [None]
    lines = ["### How far from the paper", "",
             ("Each row's runs and the settings in which they differ from the paper's for their backbone "
              "(`--recipe paper` removes all it can; the rest are listed, e.g. a CPU runs CLIP in fp32)."), "",
             "| ablation | backbone | " + ("text encoder | " if keyed else "") + "recipe | departures from the paper |",
             "|---|---|" + ("---|" if keyed else "") + "---|---|"]
    keys = ["ablation", "backbone"] + (["encoder"] if keyed else [])
    for key, group in sorted(data.finished.groupby(keys), key=lambda kv: kv[0]):
        recipes = ", ".join(sorted(set(group.recipe)))
        found = sorted(set(group.paper_departures))
        lines.append(f"| {key[0]} | {backbone_name(key[1])} | " + (f"{key[2]} | " if keyed else "") + f"{recipes} | "
                     + " / ".join(d.replace("|", "/") for d in found) + " |")
    return "\n".join(lines) + "\n"


# --- plots and main ---------------------------------------------------------------------------------


def _means(cells: list[Stat | None]) -> tuple[list[float], list[float]]:
    """Means and 95 % half-widths (NaN where missing or from one seed): the error bars of the plots."""
    return [c.mean if c else math.nan for c in cells], [c.half if c else math.nan for c in cells]


def seed_series(data: Data, main: str) -> tuple[list[str], list[plots.Interval], list[plots.Interval]]:
    """The groups (splits with runs on the main backbone, then Avg), the mean PCK@0.2 with its interval per
    (ablation, encoder), and the paired differences against ``full`` with theirs: ``seeds.png``'s panels."""
    fin = data.finished
    splits = sorted(int(k) for k in set(fin.split[fin.backbone == main]) & set(SPLITS))
    groups = [f"Split{k}" for k in splits] + ["Avg"]
    cells, diffs = [], []
    for a, b, enc in combos(data):
        if b != main:
            continue
        split_cells, avg, _ = stats(fin, MAIN, a, b, enc)
        picked = [split_cells[SPLITS.index(k)] for k in splits] + [avg if len(splits) > 1 else None]
        cells.append(plots.Interval(row_label(a, enc), a, enc or "", *_means(picked)))
        if a != REFERENCE:
            found = paired_differences(fin, MAIN, a, b, enc)
            if found:
                diffs.append(plots.Interval(row_label(a, enc), a, enc or "", *_means([found.get(g) for g in groups])))
    return groups, cells, diffs


def draw_plots(client, data: Data, out: Path, main: str, with_paper: bool) -> list[Path]:
    order = ablation_order()
    lines = [plots.Line(f"{row_label(a, e)} ({backbone_name(b) + ', ' if b else ''}{n} split{'s' * (n != 1)})",
                        a if b else "", b, *_means(cells)) for a, b, e, cells, n in threshold_rows(data)]
    paper = {a: v for t in ("table3", "table2") for a, _, v in paper_rows(t) if v and with_paper}
    bars = []
    for a, b, e in combos(data):
        cells, avg, n = stats(data.finished, MAIN, a, b, e)
        if b == main and n:
            clip = e in (None, DEFAULT_ENCODER)  # the paper's numbers are CLIP's
            bars.append(plots.Bars(row_label(a, e), a, *_means(cells + [avg]), paper.get(a, ()) if clip else ()))
    curves = []
    keyed = encoder_rows(data) != [None]
    for r in pd.concat([data.finished, data.unfinished], ignore_index=True).itertuples(index=False):
        loss, val = ([(m.step, m.value) for m in client.get_metric_history(r.run_id, k)] for k in CURVE_KEYS)
        label = f"{row_label(r.ablation, r.encoder if keyed else None)} ({backbone_name(r.backbone)})"
        curves.append(plots.Curve(r.split, r.ablation, r.backbone, label, r.status == "FINISHED", loss, val))
    groups, cells, diffs = seed_series(data, main)
    return [plots.plot_thresholds(out / "pck_vs_threshold.png", THRESHOLDS, lines, order),
            plots.plot_split_bars(out / "per_split_bars.png", SPLIT_COLUMNS, bars, order, main, backbone_name(main),
                                  PUBLISHED),
            plots.plot_curves(out / "curves.png", curves, order),
            plots.plot_seeds(out / "seeds.png", groups, cells, diffs, order, backbone_name(main), REFERENCE)]


def main_backbone(data: Data, wanted: str | None) -> str:
    """``wanted``, else swinv2_t if it has finished runs (or nothing has), else the backbone with the most
    finished runs; runs not finished (a stale RUNNING one) do not count."""
    counts = data.finished.backbone.value_counts()
    if wanted or counts.empty or "swinv2_t" in counts.index:
        return wanted or "swinv2_t"
    return max(sorted(counts.index), key=lambda b: counts[b])


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
            + f"; {len(data.unfinished)} not finished yet (not in the tables). Cells are test PCK in %: the mean "
              "over seeds ± the half-width of its 95 % t-interval (n seeds) where there are several, the value "
              f"alone for one seed, {DASH} where no run has finished.", ""]
    if args.with_paper:
        head += [(f"Rows labelled _{PUBLISHED}_ are the numbers the CapeNext paper reports (real MP-100, "
                  "pretrained backbones and CLIP ViT-B/32); they are not produced by this code."), ""]
    md = "\n".join(head) + "\n" + "\n".join(t.markdown() for t in tables)
    if len(data.finished):
        md += "\n" + departures_section(data)
    figures = draw_plots(client, data, out, main, args.with_paper)
    md += "\n### Plots\n\n" + "\n".join(f"![{p.stem}]({p.name})" for p in figures) + "\n"
    (out / "report.md").write_text(md, encoding="utf-8")
    files = ([out / "report.md"] + [t.write_csv(out) for t in tables] + [runs_csv(data, out), cells_csv(data, out)]
             + figures)
    print(md)
    print("wrote " + ", ".join(str(f) for f in files), flush=True)
    return {"out": out, "tables": tables, "files": files, "data": data}


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("MPLBACKEND", "Agg")
    report(parse_args(argv))
    return 0


if __name__ == "__main__":
    run_main(main)
