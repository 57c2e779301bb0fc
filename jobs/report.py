"""Paper-style tables and plots from MLflow: ``python -m jobs.report --experiment NAME``.

Reads the training runs of an experiment (or the children of one sweep's parent run, ``--parent-run``)
with ``mlflow.search_runs`` (a pandas DataFrame) and writes, under ``--out``:

* ``report.md`` with every table, and one CSV per table (the same cells): ``table1.csv`` (method ×
  backbone: CapeX = ablation ``baseline``, CapeNext = ``full``), ``table2.csv`` (module ablations),
  ``table3.csv`` (multimodal input), ``mpck.csv`` (mean of PCK@0.05-0.25 per split), ``pck_thresholds.csv``
  (PCK at every threshold next to the per-name mean-position floor, metrics ``floor/pck_*``), and, when evaluation runs exist
  (``capenext.kind=evaluation``), ``table4.csv`` (noise ``class``) and ``table5.csv`` (one column per other
  ``noise_variant``: ``typo@R``, ``template:NAME``, ``reference:NAME``, ``clean``, any other by its name);
* ``runs.csv``: one numeric row per finished run (the raw data behind the tables);
* ``pck_vs_threshold.png``, ``per_split_bars.png``, ``curves.png``, drawn by :mod:`jobs.reports.plots`.

Cells are test PCK@0.2 in % over the seeds of one (split, ablation, backbone): "mean ± std" when there
are several, "—" when there are none; of several finished runs of one seed, the newest counts. Avg is the
mean of the splits present, marked † when fewer than five are. Only FINISHED runs enter the tables, so the
report works while a sweep is still running. ``--with-paper`` adds the CapeNext paper's published numbers
(``paper_results.json``), each row labelled "paper (published)".
"""

from __future__ import annotations

import argparse
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
from capenext.metrics import FLOOR, THRESHOLDS, metric_keys, pck_key
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
LABEL_COLUMNS = {"Method", "Backbone", "Source", "Setting", "Ablation"}  # left-aligned in Markdown
CELL = ["split", "ablation", "backbone", "seed"]  # one finished training run counts per cell


def paper_rows(table: str) -> list[tuple[str, str, Any]]:
    """(ablation, row label, published values or None) of the paper's Table 2, 3, 4 or 5."""
    return [(r["ablation"], r["label"], r["published"]) for r in PAPER[table]["rows"]]


def ablation_order() -> list[str]:
    """The paper's seven ablations in its order, then every other registered one."""
    from capenext.models import available_ablations  # the model registry imports timm: only when needed

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
    ``seed``, ``status``, ``end_time`` and one column per metric. ``evals``: finished evaluation runs,
    ``run_id``, ``noise``, ``variant``, the cell of the training run evaluated, ``seed`` (``<training
    seed>:<noise seed>``) and ``pck`` (PCK@0.2), oldest first."""

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
    """``split`` (int), ``ablation``, ``backbone``, ``seed`` from the tags; rows without a whole-number
    split, an ablation or a backbone are dropped."""
    split = pd.to_numeric(_column(raw, "tags.split"), errors="coerce")
    out = pd.DataFrame({"split": split, "ablation": _column(raw, "tags.ablation"),
                        "backbone": _column(raw, "tags.backbone"), "seed": _column(raw, "tags.seed").fillna("?")})
    out = out[(split % 1 == 0) & out.ablation.notna() & out.backbone.notna()]
    return out.astype({"split": int, "ablation": str, "backbone": str, "seed": str})


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
        tags = pd.DataFrame([{f"tags.{k}": v for k, v in r.data.tags.items()} for r in outside],
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
    return (f"{stat.mean:.2f}" if math.isnan(stat.std) else f"{stat.mean:.2f} ± {stat.std:.2f}") + mark


def stats(frame: pd.DataFrame, metric: str, ablation: str, backbone: str) -> tuple[list, Stat | None, int]:
    """Split1..Split5 cells of ``metric`` × 100 over seeds for one (ablation, backbone), their average and
    how many splits it covers. The average's std is over the seeds that every present split has (each
    seed's own mean over the splits), so it shows seed noise, not split difficulty."""
    sel = frame[(frame.ablation == ablation) & (frame.backbone == backbone) & frame.split.isin(SPLITS)]
    sel = sel.dropna(subset=[metric]) if metric in frame else sel.iloc[:0]
    if sel.empty:
        return [None] * len(SPLITS), None, 0
    vals = pd.DataFrame({"split": sel.split, "seed": sel.seed, "value": 100.0 * sel[metric]})
    by_split = vals.groupby("split")["value"].agg(["mean", "std"])
    cells = [Stat(*by_split.loc[k]) if k in by_split.index else None for k in SPLITS]
    common = vals.pivot_table(index="seed", columns="split", values="value", aggfunc="last").dropna()
    if len(common) >= 2:
        per_seed = common.mean(axis=1)
        return cells, Stat(per_seed.mean(), per_seed.std()), len(by_split)
    return cells, Stat(by_split["mean"].mean(), math.nan), len(by_split)


def split_row(frame: pd.DataFrame, metric: str, ablation: str, backbone: str) -> tuple[list[str], bool]:
    """Split1..Split5 and Avg cells of one row; whether Avg covers fewer than five splits."""
    cells, avg, n = stats(frame, metric, ablation, backbone)
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
        self.frame.to_csv(path, index=False, lineterminator="\r\n")  # line ends as the csv module writes
        return path


def _table(name: str, title: str, columns: list[str], rows: list[list[str]], notes: list[str]) -> Table:
    return Table(name, title, pd.DataFrame(rows, columns=columns), notes)


def _source(with_paper: bool, value: str = "Source") -> list[str]:
    """The Source column (or a row's value in it) when published rows are shown."""
    return [value] if with_paper else []


def table1(data: Data, with_paper: bool, main: str) -> Table:
    have = set(zip(data.finished.ablation, data.finished.backbone))
    backbones = [b for b in PAPER["backbones"] if any((a, b) in have for a, _ in METHODS)]
    backbones += sorted({b for a, b in have if a in dict(METHODS) and b not in backbones})
    paper = [(r[0], r[1], r[3:]) for r in PAPER["table1"]["rows"]]  # method, backbone, Split1..5 and Avg
    rows, partial, shown = [], False, set()
    for ablation, method in METHODS:
        for b in backbones or [main]:
            cells, part = split_row(data.finished, MAIN, ablation, b)
            partial |= part
            rows.append([method, backbone_name(b)] + _source(with_paper, "ours") + cells)
            match = [v for m, bb, v in paper if (m, bb) == (method, backbone_name(b))]
            if with_paper and match:
                rows.append([method, backbone_name(b), PUBLISHED] + published(match[0]))
                shown.add((method, backbone_name(b)))
    rows += [[m, bb, PUBLISHED] + published(v) for m, bb, v in paper if with_paper and (m, bb) not in shown]
    return _table("table1", PAPER["table1"]["title"], ["Method", "Backbone"] + _source(with_paper) + SPLIT_COLUMNS,
                  rows, [PARTIAL_NOTE] if partial else [])


def setting_table(name: str, title: str, frame: pd.DataFrame, metric: str, with_paper: bool, main: str,
                  suffix: str = "") -> Table:
    """The rows of the paper's table ``name`` (labels + ``suffix``) on the main backbone, each followed by
    its published row."""
    rows, partial = [], False
    for ablation, label, paper in paper_rows(name):
        cells, part = split_row(frame, metric, ablation, main)
        partial |= part
        rows.append([label + suffix] + _source(with_paper, "ours") + cells)
        if with_paper:
            rows.append([label + suffix, PUBLISHED] + published(paper))
    notes = [PARTIAL_NOTE] if partial else []
    if with_paper and any(paper is None for *_, paper in paper_rows(name)):
        notes.append(f"{DASH} in a published row: the paper reports no such setting.")
    return _table(name, title, ["Setting"] + _source(with_paper) + SPLIT_COLUMNS, rows, notes)


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
    mean-position floor last, with backbone ``""``: per split the mean over its runs, then over splits."""
    out = []
    for ablation, backbone in combos(data):
        avgs = [stats(data.finished, key, ablation, backbone)[1:] for key in metric_keys("test")]
        out.append((ablation, backbone, [s for s, _ in avgs], avgs[-1][1]))
    if not data.finished.empty:
        keys = metric_keys(FLOOR)
        per_split = data.finished.reindex(columns=["split"] + keys).groupby("split")[keys].mean()
        cells = [Stat(100.0 * per_split[k].mean(), math.nan) if per_split[k].notna().any() else None for k in keys]
        out.append((FLOOR_LABEL, "", cells, int(per_split[keys[-1]].notna().sum())))
    return out


def threshold_table(data: Data) -> Table:
    rows = [[label, backbone_name(backbone) if backbone else DASH] + [fmt(c) for c in cells] + [str(n)]
            for label, backbone, cells, n in threshold_rows(data)]
    return _table("pck_thresholds", "PCK (%) at each threshold, mean over the splits present",
                  ["Ablation", "Backbone"] + [f"PCK@{t:g}" for t in THRESHOLDS] + ["mPCK", "Splits"],
                  rows or [[DASH, DASH] + [DASH] * (len(THRESHOLDS) + 1) + ["0"]],
                  [f"The {FLOOR_LABEL} predicts each keypoint name at its mean training position (no image): the floor "
         "a model must beat."])


def latest_evals(evals: pd.DataFrame) -> pd.DataFrame:
    """One value per (variant, cell, training seed, noise seed): a repeated evaluation replaces the older."""
    return evals.drop_duplicates(["noise", "variant"] + CELL, keep="last")


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
    rows, partial = [], False
    for ablation, label, paper in paper_rows("table5"):
        row = []
        for v in variants:
            _, avg, n = stats(evals[evals.variant == v], "pck", ablation, main)
            partial |= 0 < n < len(SPLITS)
            row.append(fmt(avg, "†" if 0 < n < len(SPLITS) else ""))
        rows.append([label] + _source(with_paper, "ours") + row)
        if with_paper:
            keys = [describe(v)[2] for v in variants]
            rows.append([label, PUBLISHED] + [f"{paper[k]:.2f}" if k in (paper or {}) else DASH for k in keys])
    notes = ["Each cell is the mean over the splits evaluated. " + PARTIAL_NOTE if partial else
             "Each cell is the mean over the five splits."] + ([PAPER["table5"]["note"]] if with_paper else [])
    if any(describe(v)[1].startswith(APPROX) for v in variants):
        notes.append(f"{APPROX}: our approximation of a paper column (a typo rate, a template rewriting every text), "
                     "not the reference's texts: not set against the paper's numbers.")
    columns = ["Method"] + _source(with_paper) + [describe(v)[1] for v in variants]
    return _table("table5", f"{PAPER['table5']['title']}, backbone {backbone_name(main)}", columns, rows, notes)


def build_tables(data: Data, with_paper: bool, main: str) -> list[Table]:
    tables = [table1(data, with_paper, main)]
    tables += [setting_table(t, f"{PAPER[t]['title']} (PCK@0.2 %, backbone {backbone_name(main)})",
                             data.finished, MAIN, with_paper, main) for t in ("table2", "table3")]
    tables += [mpck_table(data), threshold_table(data)]
    return tables + [t for t in (table4(data, with_paper, main), table5(data, with_paper, main)) if t is not None]


def runs_csv(data: Data, folder: Path) -> Path:
    """Every finished run, one numeric row: the raw data of the tables."""
    keys = sorted(k for k in data.finished if k.startswith(("test/", f"{FLOOR}/", "val/")))
    path = folder / "runs.csv"
    data.finished.rename(columns={"name": "run_name"})[["run_id", "run_name", "split", "ablation", "backbone",
                                                        "seed", "recipe", "paper_departures"] + keys].to_csv(
        path, index=False, lineterminator="\r\n")
    return path


def departures_section(data: Data) -> str:
    """How far the runs behind each row are from the paper: per (ablation, backbone), the recipe and every
    distinct list of departures its finished runs recorded (``paper_departures`` tags)."""
    lines = ["### How far from the paper", "",
             "Each row's runs and the settings in which they differ from the paper's for their backbone "
             "(`--recipe paper` removes all it can; the rest are listed, e.g. a CPU runs CLIP in fp32).", "",
             "| ablation | backbone | recipe | departures from the paper |", "|---|---|---|---|"]
    frame = data.finished
    for (ablation, backbone), group in sorted(frame.groupby(["ablation", "backbone"]), key=lambda kv: kv[0]):
        recipes = ", ".join(sorted(set(group.recipe)))
        found = sorted(set(group.paper_departures))
        lines.append(f"| {ablation} | {backbone_name(backbone)} | {recipes} | "
                     + " / ".join(d.replace("|", "/") for d in found) + " |")
    return "\n".join(lines) + "\n"


# --- plots and main ---------------------------------------------------------------------------------


def _means(cells: list[Stat | None]) -> tuple[list[float], list[float]]:
    return [c.mean if c else math.nan for c in cells], [c.std if c else math.nan for c in cells]


def draw_plots(client, data: Data, out: Path, main: str, with_paper: bool) -> list[Path]:
    order = ablation_order()
    lines = [plots.Line(f"{a} ({backbone_name(b) + ', ' if b else ''}{n} split{'s' * (n != 1)})", a if b else "",
                        b, *_means(cells)) for a, b, cells, n in threshold_rows(data)]
    paper = {a: v for t in ("table3", "table2") for a, _, v in paper_rows(t) if v and with_paper}
    bars = []
    for a, b in combos(data):
        cells, avg, n = stats(data.finished, MAIN, a, b)
        if b == main and n:
            bars.append(plots.Bars(a, *_means(cells + [avg]), paper.get(a, ())))
    curves = []
    for r in pd.concat([data.finished, data.unfinished], ignore_index=True).itertuples(index=False):
        loss, val = ([(m.step, m.value) for m in client.get_metric_history(r.run_id, k)] for k in CURVE_KEYS)
        curves.append(plots.Curve(r.split, r.ablation, r.backbone, f"{r.ablation} ({backbone_name(r.backbone)})",
                                  r.status == "FINISHED", loss, val))
    return [plots.plot_thresholds(out / "pck_vs_threshold.png", THRESHOLDS, lines, order),
            plots.plot_split_bars(out / "per_split_bars.png", SPLIT_COLUMNS, bars, order, main, backbone_name(main),
                                  PUBLISHED),
            plots.plot_curves(out / "curves.png", curves, order)]


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
            + f"; {len(data.unfinished)} not finished yet (not in the tables). Cells are test PCK in %, "
              f"mean ± std over seeds where there are several; {DASH} where no run has finished.", ""]
    if args.with_paper:
        head += [f"Rows labelled _{PUBLISHED}_ are the numbers the CapeNext paper reports (real MP-100, "
                 "pretrained backbones and CLIP ViT-B/32); they are not produced by this code.", ""]
    md = "\n".join(head) + "\n" + "\n".join(t.markdown() for t in tables)
    if len(data.finished):
        md += "\n" + departures_section(data)
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
