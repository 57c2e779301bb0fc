"""Paper-style tables and plots from MLflow: ``python -m jobs.report --experiment NAME``.

Reads the training runs of an experiment (or the children of one sweep's parent run, ``--parent-run``)
with ``MlflowClient.search_runs`` and writes, under ``--out``:

* ``report.md``: every table in Markdown, and one CSV per table (same cells):
  - Table 1 (``table1.csv``): rows method/backbone (CapeX = ablation ``baseline``, CapeNext = ``full``),
    columns Split1-5 and Avg, test PCK@0.2 in %;
  - Table 2 (``table2.csv``): the module ablations ``full``, ``no_hcmi``, ``no_dsfr``, ``no_lw``;
  - Table 3 (``table3.csv``): ``baseline`` → ``img_only`` (+img) → ``full`` (+img & cls), and ``cls_only``;
  - ``mpck.csv``: the mean of PCK@0.05-0.25 per split; ``pck_thresholds.csv``: PCK at every threshold,
    averaged over the splits, next to the per-name mean-position baseline;
  - Tables 4 and 5 (``table4.csv``, ``table5.csv``), when evaluation runs exist (``capenext.kind=evaluation``,
    tags ``noise`` = class|typo|template, ``noise_variant``, ``training_run_id``): PCK@0.2 under noisy class
    prompts, and under noisy keypoint prompts;
* ``runs.csv``: one numeric row per finished run (the raw data behind the tables);
* ``pck_vs_threshold.png``, ``per_split_bars.png``, ``curves.png`` (training loss and val PCK@0.2 per
  epoch), drawn with matplotlib's Agg backend.

A cell averages the runs of one (split, ablation, backbone) over their seeds: "mean ± std" when there
are several, "—" when there are none. Avg is the mean of the splits present; marked † when fewer than
five are. Only FINISHED runs enter the tables, so the report works while a sweep is still running (the
curves also show running runs, dashed). ``--with-paper`` adds the published numbers of the CapeNext paper
(Tables 1-5), each row labelled "paper (published)".
"""

from __future__ import annotations

import argparse
import csv
import math
import os
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from capenext.cli import UsageError, run_main
from capenext.config import THRESHOLDS

DASH = "—"
SPLITS = (1, 2, 3, 4, 5)
MAIN = "test/pck_0.2"

BACKBONE_NAMES = {"swinv2_t": "Swinv2-T", "hrnet_w32": "HRNet-w32", "vit_b16": "ViT-Base-16",
                  "dinov2_vits": "DINOv2-ViT-S", "tiny": "tiny (tests)"}
BACKBONE_ORDER = ("hrnet_w32", "vit_b16", "dinov2_vits", "swinv2_t")  # the paper's Table 1 order
METHODS = {"baseline": "CapeX", "full": "CapeNext"}  # Table 1: which ablation is which method
TABLE2_ROWS = (("full", "CapeNext"), ("no_hcmi", "CapeNext w/o HCMI"), ("no_dsfr", "CapeNext w/o DSFR"),
               ("no_lw", "CapeNext w/o LW"))
TABLE3_ROWS = (("baseline", "Baseline"), ("img_only", "+img emb"), ("cls_only", "+cls emb"),
               ("full", "+img & cls emb"))
TABLE4_ROWS = (("no_lw", "Ours w/o LW"), ("full", "Ours w/ LW"))
TABLE5_ROWS = (("baseline", "CapeX"), ("full", "CapeNext"))
TEMPLATE_ORDER = ("paw-foreleg", "elbow-forearm", "eye-eyeball", "paw-foot", "shoulder-upper_arm")
ABLATION_ORDER = ("full", "no_hcmi", "no_dsfr", "no_lw", "baseline", "img_only", "cls_only")

# --- the paper's published numbers (CapeNext paper, Tables 1-5; PCK@0.2 in %, 1-shot MP-100) -----------
# Table 1: (method, image backbone, CLIP backbone) -> Split1..Split5, Avg
PAPER_TABLE1: list[tuple[str, str, str, tuple[float, ...]]] = [
    ("POMNet", "ResNet-50", "-", (84.23, 78.25, 78.17, 78.68, 79.17, 79.70)),
    ("CapeFormer", "ResNet-50", "-", (89.45, 84.88, 83.59, 83.53, 85.09, 85.31)),
    ("ESCAPE", "ResNet-50", "-", (86.89, 82.55, 81.25, 81.72, 81.32, 82.74)),
    ("MetaPoint+", "ResNet-50", "-", (90.43, 85.59, 84.52, 84.34, 85.96, 86.17)),
    ("X-Pose", "ResNet-50", "ViT-Base-32", (89.07, 85.05, 85.26, 85.52, 85.79, 86.14)),
    ("SDPNet", "HRNet-32", "-", (91.54, 86.72, 85.49, 85.77, 87.26, 87.36)),
    ("GraphCape", "Swinv2-T", "-", (91.19, 87.81, 85.68, 85.87, 85.61, 87.23)),
    ("CapeX", "HRNet-w32", "ViT-Base-32", (89.1, 85.0, 81.9, 84.4, 85.4, 85.2)),
    ("CapeX", "ViT-Base-16", "ViT-Base-32", (90.75, 82.87, 83.18, 85.95, 85.49, 85.65)),
    ("CapeX", "DINOv2-ViT-S", "ViT-Base-32", (90.6, 83.74, 83.67, 86.87, 85.93, 86.18)),
    ("CapeX", "Swinv2-T", "ViT-Base-32", (91.9, 86.97, 84.41, 86.13, 88.64, 87.61)),
    ("CapeNext", "HRNet-w32", "ViT-Base-32", (90.2, 86.0, 82.9, 85.4, 87.1, 86.3)),
    ("CapeNext", "ViT-Base-16", "ViT-Base-32", (90.84, 86.73, 86.5, 82.44, 87.91, 86.88)),
    ("CapeNext", "DINOv2-ViT-S", "ViT-Base-32", (92.12, 87.75, 83.76, 87.16, 88.95, 87.95)),
    ("CapeNext", "Swinv2-T", "ViT-Base-32", (92.44, 87.31, 85.44, 86.47, 90.17, 88.37)),
]
# Tables 2-4 (Swinv2-T): ablation -> Split1..Split5, Avg
PAPER_TABLE2 = {"full": (92.44, 87.31, 85.44, 86.47, 90.17, 88.37),
                "no_hcmi": (91.43, 83.4, 84.97, 87.27, 86.98, 86.81),
                "no_dsfr": (89.04, 82.72, 82.94, 82.97, 83.58, 84.25),
                "no_lw": (92.59, 86.8, 85.03, 86.52, 90.5, 88.28)}
PAPER_TABLE3 = {"baseline": (91.9, 86.97, 84.41, 86.13, 88.64, 87.61),
                "img_only": (92.77, 87.36, 84.55, 86.31, 89.76, 88.15),
                "full": (92.44, 87.31, 85.44, 86.47, 90.17, 88.37)}
PAPER_TABLE4 = {"no_lw": (92.23, 86.18, 84.64, 84.96, 89.91, 87.58),
                "full": (91.94, 86.94, 85.48, 86.12, 90.27, 88.15)}
# Table 5: method -> noisy keypoint prompt -> PCK@0.2 (the paper does not state its typo rate)
PAPER_TABLE5 = {"baseline": {"typo": 64.10, "paw-foreleg": 86.77, "elbow-forearm": 87.37, "eye-eyeball": 87.60,
                             "paw-foot": 87.38, "shoulder-upper_arm": 86.81},
                "full": {"typo": 66.35, "paw-foreleg": 87.30, "elbow-forearm": 88.05, "eye-eyeball": 88.19,
                         "paw-foot": 88.06, "shoulder-upper_arm": 87.58}}
PUBLISHED = "paper (published)"


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
                   help="backbone of Tables 2-5 and the bar plot (default swinv2_t if it has runs, else the "
                        "backbone with the most runs)")
    p.add_argument("--tracking-uri", default=None,
                   help="MLflow store or server (default MLFLOW_TRACKING_URI, else sqlite:///./mlflow.db)")
    return p.parse_args(argv)


# --- reading MLflow ---------------------------------------------------------------------------------


@dataclass
class RunInfo:
    """One training run, as the report needs it."""

    run_id: str
    name: str
    split: int
    ablation: str
    backbone: str
    seed: str
    status: str
    end_time: int
    metrics: dict[str, float]


@dataclass
class EvalInfo:
    """One evaluation run (jobs.evaluate), mapped to the training run it evaluated."""

    run_id: str
    noise: str
    variant: str
    split: int
    ablation: str
    backbone: str
    seed: str  # "<training seed>:<noise seed>"
    pck: float


@dataclass
class Data:
    finished: list[RunInfo]
    unfinished: list[RunInfo]
    evals: list[EvalInfo] = field(default_factory=list)


def resolve_uri(arg: str | None) -> str:
    from jobs.train import tracking_uri

    uri = arg or tracking_uri()
    if uri.startswith("sqlite:///"):
        db = Path(uri[len("sqlite:///"):].split("?", 1)[0])
        if not db.is_file():
            raise UsageError(f"no MLflow store at {db.resolve()} (tracking URI {uri}): set MLFLOW_TRACKING_URI or "
                             "--tracking-uri to the store or server the runs were logged to")
    return uri


def _search(client, experiment_id: str, query: str) -> list:
    out, token = [], None
    while True:
        page = client.search_runs([experiment_id], query, max_results=1000, page_token=token)
        out.extend(page)
        token = page.token
        if not token:
            return out


def _int(text: Any) -> int | None:
    try:
        return int(str(text))
    except (TypeError, ValueError):
        return None


def _run_info(run) -> RunInfo | None:
    tags = run.data.tags
    split = _int(tags.get("split"))
    if split is None or "ablation" not in tags or "backbone" not in tags:
        return None
    return RunInfo(run.info.run_id, tags.get("capenext.run_name") or run.info.run_name or run.info.run_id,
                   split, tags["ablation"], tags["backbone"], tags.get("seed", "?"), run.info.status,
                   run.info.end_time or 0, dict(run.data.metrics))


def _eval_pck(metrics: dict[str, float]) -> float | None:
    for key in ("test/pck_0.2", "eval/pck_0.2", "pck_0.2"):
        if key in metrics:
            return metrics[key]
    found = [v for k, v in metrics.items() if k.endswith("pck_0.2")]
    return found[0] if found else None


def load(client, experiment: str, parent: str | None) -> Data:
    """The experiment's training runs (children of ``parent`` if given) and its evaluation runs."""
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        names = sorted(e.name for e in client.search_experiments())
        raise UsageError(f"experiment {experiment!r} not found in the MLflow store; experiments: {names}")
    if parent is not None:
        try:
            client.get_run(parent)
        except Exception:
            raise UsageError(f"--parent-run {parent}: no such run in the MLflow store") from None
    query = f"tags.`mlflow.parentRunId` = '{parent}'" if parent else ""
    runs = _search(client, exp.experiment_id, query)
    finished, unfinished, by_id = [], [], {}
    for run in runs:
        kind = run.data.tags.get("capenext.kind")
        if kind in ("sweep", "evaluation"):
            continue
        info = _run_info(run)
        if info is None:
            continue
        by_id[info.run_id] = info
        (finished if info.status == "FINISHED" else unfinished).append(info)
    # the newest finished run per (split, ablation, backbone, seed): a re-run replaces an older one
    latest: dict[tuple, RunInfo] = {}
    for r in sorted(finished, key=lambda r: r.end_time):
        latest[(r.split, r.ablation, r.backbone, r.seed)] = r
    data = Data(sorted(latest.values(), key=lambda r: (r.backbone, r.ablation, r.split, r.seed)), unfinished)

    evals = _search(client, exp.experiment_id, "tags.`capenext.kind` = 'evaluation'")
    for run in sorted(evals, key=lambda r: r.info.start_time or 0):  # the newest of repeated evaluations wins
        if run.info.status != "FINISHED":
            continue
        tags = run.data.tags
        trained = by_id.get(tags.get("training_run_id", ""))
        if trained is None and parent is not None:
            continue  # evaluates a run outside this sweep
        if trained is None and tags.get("training_run_id"):
            try:
                trained = _run_info(client.get_run(tags["training_run_id"]))
            except Exception:
                trained = None
        source = trained or _run_info(run)
        pck = _eval_pck(run.data.metrics)
        noise = tags.get("noise", "")
        if source is None or pck is None or noise not in ("class", "typo", "template"):
            continue
        variant = tags.get("noise_variant", noise)
        # one value per (training seed, noise seed): a repeated evaluation replaces, another seed adds
        noise_seed = run.data.params.get("seed") or run.data.params.get("noise_seed") or run.info.run_id
        data.evals.append(EvalInfo(run.info.run_id, noise, variant, source.split, source.ablation,
                                   source.backbone, f"{source.seed}:{noise_seed}", pck))
    return data


# --- cells: mean ± std over seeds -------------------------------------------------------------------


@dataclass
class Cell:
    """Values (in %) of one table cell, one per seed; and per-seed values for averaging across splits."""

    by_seed: dict[str, float]

    @property
    def values(self) -> list[float]:
        return list(self.by_seed.values())

    @property
    def mean(self) -> float:
        return sum(self.values) / len(self.values)

    @property
    def std(self) -> float:
        v = self.values
        if len(v) < 2:
            return 0.0
        m = self.mean
        return math.sqrt(sum((x - m) ** 2 for x in v) / (len(v) - 1))


def fmt(cell: Cell | None, mark: str = "") -> str:
    """``45.12``, ``45.12 ± 1.03`` (several seeds), or ``—``."""
    if cell is None or not cell.values:
        return DASH
    text = f"{cell.mean:.2f}" if len(cell.values) == 1 else f"{cell.mean:.2f} ± {cell.std:.2f}"
    return text + mark


def collect(runs: Iterable[RunInfo], metric: str) -> dict[tuple[str, str, int], Cell]:
    """(ablation, backbone, split) → Cell of ``metric`` × 100 over seeds."""
    cells: dict[tuple[str, str, int], dict[str, float]] = defaultdict(dict)
    for r in runs:
        if metric in r.metrics:
            cells[(r.ablation, r.backbone, r.split)][r.seed] = 100.0 * r.metrics[metric]
    return {k: Cell(v) for k, v in cells.items()}


def average(cells: list[Cell | None]) -> tuple[Cell | None, int]:
    """The mean over the cells present, and how many there are. Its std is over the seeds that every
    present cell has (each seed's own average), so it shows seed noise, not split difficulty."""
    present = [c for c in cells if c is not None and c.values]
    if not present:
        return None, 0
    common = set.intersection(*(set(c.by_seed) for c in present))
    if len(common) >= 2:
        return Cell({s: sum(c.by_seed[s] for c in present) / len(present) for s in sorted(common)}), len(present)
    return Cell({"mean": sum(c.mean for c in present) / len(present)}), len(present)


# --- tables -----------------------------------------------------------------------------------------


LABEL_COLUMNS = {"Method", "Backbone", "Source", "Setting", "Ablation"}  # left-aligned in Markdown


@dataclass
class Table:
    name: str  # file stem
    title: str
    columns: list[str]
    rows: list[list[str]]
    notes: list[str] = field(default_factory=list)

    def markdown(self) -> str:
        lines = [f"### {self.title}", "", "| " + " | ".join(self.columns) + " |",
                 "|" + "|".join("---" if c in LABEL_COLUMNS else "---:" for c in self.columns) + "|"]
        lines += ["| " + " | ".join(row) + " |" for row in self.rows]
        for note in self.notes:  # one paragraph each
            lines += ["", f"_{note}_"]
        return "\n".join(lines) + "\n"

    def write_csv(self, folder: Path) -> Path:
        path = folder / f"{self.name}.csv"
        with open(path, "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(self.columns)
            w.writerows(self.rows)
        return path


def split_row(cells: dict, ablation: str, backbone: str) -> tuple[list[str], bool]:
    """Split1..Split5 and Avg cells of one row; whether Avg covers fewer than five splits."""
    row = [cells.get((ablation, backbone, k)) for k in SPLITS]
    avg, n = average(row)
    partial = 0 < n < len(SPLITS)
    return [fmt(c) for c in row] + [fmt(avg, "†" if partial else "")], partial


def published(values: tuple[float, ...] | None) -> list[str]:
    return [f"{v:.2f}" for v in values] if values else [DASH] * (len(SPLITS) + 1)


PARTIAL_NOTE = "† mean over the splits present (fewer than five)."
SPLIT_COLUMNS = [f"Split{k}" for k in SPLITS] + ["Avg"]


def table1(data: Data, with_paper: bool, main: str) -> Table:
    cells = collect(data.finished, MAIN)
    have = {(r.ablation, r.backbone) for r in data.finished}
    backbones = [b for b in BACKBONE_ORDER if any((a, b) in have for a in METHODS)]
    backbones += sorted({b for a, b in have if a in METHODS and b not in backbones})
    backbones = backbones or [main]
    source = ["Source"] if with_paper else []
    rows, partial = [], False
    shown_paper = set()
    for ablation, method in (("baseline", "CapeX"), ("full", "CapeNext")):
        for b in backbones:
            label = BACKBONE_NAMES.get(b, b)
            values, part = split_row(cells, ablation, b)
            partial |= part
            rows.append([method, label] + (["ours"] if with_paper else []) + values)
            if with_paper:
                match = [v for m, bb, _, v in PAPER_TABLE1 if m == method and bb == label]
                if match:
                    rows.append([method, label, PUBLISHED] + published(match[0]))
                    shown_paper.add((method, label))
    if with_paper:
        for m, bb, _, v in PAPER_TABLE1:
            if (m, bb) not in shown_paper:
                rows.append([m, bb, PUBLISHED] + published(v))
    notes = [PARTIAL_NOTE] if partial else []
    return Table("table1", "Table 1: PCK@0.2 (%) on the MP-100 test categories, by method and backbone",
                 ["Method", "Backbone"] + source + SPLIT_COLUMNS, rows, notes)


def ablation_table(name: str, title: str, data: Data, spec, paper: dict, with_paper: bool, main: str,
                   metric: str = MAIN) -> Table:
    cells = collect(data.finished, metric)
    rows, partial = [], False
    for ablation, label in spec:
        values, part = split_row(cells, ablation, main)
        partial |= part
        rows.append([label] + (["ours"] if with_paper else []) + values)
        if with_paper:
            rows.append([label, PUBLISHED] + published(paper.get(ablation)))
    notes = [PARTIAL_NOTE] if partial else []
    if with_paper and any(a not in paper for a, _ in spec):
        notes.append(f"{DASH} in a published row: the paper reports no such setting.")
    return Table(name, f"{title} (PCK@0.2 %, backbone {BACKBONE_NAMES.get(main, main)})",
                 ["Setting"] + (["Source"] if with_paper else []) + SPLIT_COLUMNS, rows, notes)


def _combos(data: Data) -> list[tuple[str, str]]:
    have = {(r.ablation, r.backbone) for r in data.finished}
    order = {a: i for i, a in enumerate(ABLATION_ORDER)}
    return sorted(have, key=lambda ab: (ab[1], order.get(ab[0], 99), ab[0]))


def mpck_table(data: Data) -> Table:
    cells = collect(data.finished, "test/pck_mean")
    rows, partial = [], False
    for ablation, backbone in _combos(data):
        values, part = split_row(cells, ablation, backbone)
        partial |= part
        rows.append([ablation, BACKBONE_NAMES.get(backbone, backbone)] + values)
    if not rows:
        rows.append([DASH, DASH] + [DASH] * len(SPLIT_COLUMNS))
    return Table("mpck", "mPCK (%): the mean of PCK@0.05, 0.1, 0.15, 0.2 and 0.25, per split",
                 ["Ablation", "Backbone"] + SPLIT_COLUMNS, rows, [PARTIAL_NOTE] if partial else [])


def threshold_rows(data: Data) -> list[tuple[str, str, list[Cell | None], int]]:
    """(label, backbone, cells at each threshold + mean averaged over splits, number of splits)."""
    keys = [f"pck_{t:g}" for t in THRESHOLDS] + ["pck_mean"]
    out = []
    for ablation, backbone in _combos(data):
        cells, n = [], 0
        for key in keys:
            per_split = collect(data.finished, f"test/{key}")
            avg, n = average([per_split.get((ablation, backbone, k)) for k in SPLITS])
            cells.append(avg)
        out.append((ablation, backbone, cells, n))
    if data.finished:  # the per-name mean-position baseline, logged by every run on its test episodes
        cells = []
        for key in keys:
            per_split: dict[int, dict[str, float]] = defaultdict(dict)
            for r in data.finished:
                if f"baseline/{key}" in r.metrics:
                    per_split[r.split][r.run_id] = 100.0 * r.metrics[f"baseline/{key}"]
            split_means = [Cell({"m": sum(v.values()) / len(v)}) for v in per_split.values() if v]
            avg, n = average(split_means)
            cells.append(avg)
        out.append(("mean-position baseline", "", cells, n))
    return out


def threshold_table(data: Data) -> Table:
    rows = []
    for label, backbone, cells, n in threshold_rows(data):
        rows.append([label, BACKBONE_NAMES.get(backbone, backbone) if backbone else DASH]
                    + [fmt(c) for c in cells] + [str(n)])
    if not rows:
        rows.append([DASH, DASH] + [DASH] * (len(THRESHOLDS) + 1) + ["0"])
    return Table("pck_thresholds", "PCK (%) at each threshold, mean over the splits present",
                 ["Ablation", "Backbone"] + [f"PCK@{t:g}" for t in THRESHOLDS] + ["mPCK", "Splits"], rows,
                 ["The mean-position baseline predicts each keypoint name at its mean training position "
                  "(no image): the floor a model must beat."])


def _eval_cells(evals: Iterable[EvalInfo]) -> dict[tuple[str, str, int], Cell]:
    cells: dict[tuple[str, str, int], dict[str, float]] = defaultdict(dict)
    for e in evals:
        cells[(e.ablation, e.backbone, e.split)][e.seed] = 100.0 * e.pck
    return {k: Cell(v) for k, v in cells.items()}


def table4(data: Data, with_paper: bool, main: str) -> Table | None:
    evals = [e for e in data.evals if e.noise == "class"]
    if not evals:
        return None
    cells = _eval_cells(evals)
    rows, partial = [], False
    for ablation, label in TABLE4_ROWS:
        values, part = split_row(cells, ablation, main)
        partial |= part
        rows.append([label] + (["ours"] if with_paper else []) + values)
        if with_paper:
            rows.append([label, PUBLISHED] + published(PAPER_TABLE4.get(ablation)))
    return Table("table4", f"Table 4: PCK@0.2 (%) with noisy class prompts (a wrong category's name), backbone "
                           f"{BACKBONE_NAMES.get(main, main)}",
                 ["Setting"] + (["Source"] if with_paper else []) + SPLIT_COLUMNS, rows,
                 [PARTIAL_NOTE] if partial else [])


def _variant_key(noise: str, variant: str) -> str:
    """``template:paw-foreleg`` → ``paw-foreleg``; ``typo@0.1`` stays; a bare ``typo`` stays."""
    return variant.split(":", 1)[1] if variant.startswith("template:") else variant


def _variant_label(key: str) -> str:
    if key.startswith("typo"):
        return "keypoint typo" + (f" (rate {key.split('@', 1)[1]})" if "@" in key else "")
    a, _, b = key.partition("-")
    return f"{a.replace('_', ' ')}→{b.replace('_', ' ')}" if b else key


def table5(data: Data, with_paper: bool, main: str) -> Table | None:
    evals = [e for e in data.evals if e.noise in ("typo", "template") and e.backbone == main]
    if not evals:
        return None
    keys = sorted({_variant_key(e.noise, e.variant) for e in evals},
                  key=lambda k: (0, k) if k.startswith("typo") else
                  (1, TEMPLATE_ORDER.index(k) if k in TEMPLATE_ORDER else 99, k))
    rows, partial = [], False
    for ablation, label in TABLE5_ROWS:
        row = []
        for key in keys:
            sel = [e for e in evals if _variant_key(e.noise, e.variant) == key and e.ablation == ablation]
            cells = _eval_cells(sel)
            avg, n = average([cells.get((ablation, main, k)) for k in SPLITS])
            partial |= 0 < n < len(SPLITS)
            row.append(fmt(avg, "†" if 0 < n < len(SPLITS) else ""))
        rows.append([label] + (["ours"] if with_paper else []) + row)
        if with_paper:
            paper = PAPER_TABLE5.get(ablation, {})
            published_keys = ["typo" if k.startswith("typo") else k for k in keys]
            rows.append([label, PUBLISHED] + [f"{paper[k]:.2f}" if k in paper else DASH for k in published_keys])
    notes = ["Each cell is the mean over the splits evaluated. " + PARTIAL_NOTE if partial else
             "Each cell is the mean over the five splits."]
    if with_paper:
        notes.append("The paper does not state its typo rate.")
    return Table("table5",
                 f"Table 5: PCK@0.2 (%) with noisy keypoint prompts, backbone {BACKBONE_NAMES.get(main, main)}",
                 ["Method"] + (["Source"] if with_paper else []) + [_variant_label(k) for k in keys], rows, notes)


def runs_csv(data: Data, folder: Path) -> Path:
    """Every finished run, one numeric row: the raw data of the tables."""
    keys = sorted({k for r in data.finished for k in r.metrics if k.startswith(("test/", "baseline/", "val/"))})
    path = folder / "runs.csv"
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["run_id", "run_name", "split", "ablation", "backbone", "seed"] + keys)
        for r in data.finished:
            w.writerow([r.run_id, r.name, r.split, r.ablation, r.backbone, r.seed]
                       + [r.metrics.get(k, "") for k in keys])
    return path


# --- plots ------------------------------------------------------------------------------------------


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _color(i: int):
    return _plt().get_cmap("tab10")(i % 10)


def _ablation_color(ablation: str):
    """One colour per ablation, the same in every plot."""
    if ablation in ABLATION_ORDER:
        return _color(ABLATION_ORDER.index(ablation))
    return _color(len(ABLATION_ORDER) + sum(map(ord, ablation)) % 3)


def _backbone_marker(backbone: str, backbones: list[str]) -> str:
    return "os^Dv<>p"[backbones.index(backbone) % 8] if backbone in backbones else "o"


def plot_thresholds(data: Data, path: Path) -> Path:
    """PCK against threshold, one line per (ablation, backbone), the mean-position baseline dashed."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    xs = list(THRESHOLDS)
    rows = threshold_rows(data)
    backbones = sorted({b for _, b, _, _ in rows if b})
    for label, backbone, cells, n in rows:
        ys = [c.mean if c is not None else math.nan for c in cells[: len(xs)]]
        err = [c.std if c is not None else 0.0 for c in cells[: len(xs)]]
        if backbone:
            ax.errorbar(xs, ys, yerr=err if any(err) else None, marker=_backbone_marker(backbone, backbones),
                        capsize=3, color=_ablation_color(label),
                        label=f"{label} ({BACKBONE_NAMES.get(backbone, backbone)}, {n} split{'s' * (n != 1)})")
        else:
            ax.plot(xs, ys, "--", color="0.4", marker="x", label=f"{label} ({n} split{'s' * (n != 1)})")
    if not rows:
        ax.text(0.5, 0.5, "no finished runs yet", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel("PCK threshold (fraction of the bounding-box size)")
    ax.set_ylabel("test PCK (%)")
    ax.set_xticks(xs)
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    ax.set_title("Test PCK against threshold (mean over splits)")
    if rows:
        ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_split_bars(data: Data, path: Path, main: str, with_paper: bool) -> Path:
    """PCK@0.2 per split (and Avg), one bar per ablation of the main backbone; published values as ×."""
    plt = _plt()
    cells = collect(data.finished, MAIN)
    order = {a: i for i, a in enumerate(ABLATION_ORDER)}
    ablations = sorted({a for a, b, _ in cells if b == main}, key=lambda a: (order.get(a, 99), a))
    groups = [f"Split{k}" for k in SPLITS] + ["Avg"]
    fig, ax = plt.subplots(figsize=(11, 4.5))
    width = 0.8 / max(1, len(ablations))
    paper_all = {**PAPER_TABLE3, **PAPER_TABLE2}
    marked = False
    for i, a in enumerate(ablations):
        row = [cells.get((a, main, k)) for k in SPLITS]
        avg, _ = average(row)
        row.append(avg)
        xs = [g + (i - (len(ablations) - 1) / 2) * width for g in range(len(groups))]
        ys = [c.mean if c is not None else 0.0 for c in row]
        err = [c.std if c is not None else 0.0 for c in row]
        ax.bar(xs, ys, width * 0.95, yerr=err if any(err) else None, capsize=2, color=_ablation_color(a),
               label=a)
        for x, c in zip(xs, row):
            if c is None:
                ax.text(x, 1, DASH, ha="center", va="bottom", fontsize=8, color="0.3")
        if with_paper and a in paper_all:
            ax.plot(xs, paper_all[a], "kx", markersize=6, label=None if marked else PUBLISHED)
            marked = True
    if not ablations:
        ax.text(0.5, 0.5, f"no finished runs with backbone {main} yet", ha="center", va="center",
                transform=ax.transAxes)
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels(groups)
    ax.set_ylabel("test PCK@0.2 (%)")
    ax.set_ylim(0, 100)
    ax.grid(axis="y", alpha=0.3)
    ax.set_title(f"PCK@0.2 per split and ablation (backbone {BACKBONE_NAMES.get(main, main)})")
    if ablations:  # outside the axes: the published markers sit near the top
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_curves(client, data: Data, path: Path) -> Path:
    """Training loss and val PCK@0.2 per epoch; one column per split, one colour per ablation (a marker per
    backbone); runs not finished (running, failed) dashed."""
    plt = _plt()
    runs = data.finished + data.unfinished
    splits = sorted({r.split for r in runs}) or [1]
    fig, axes = plt.subplots(2, len(splits), figsize=(4.2 * len(splits), 6.5), squeeze=False, sharex="col")
    combos = sorted({(r.ablation, r.backbone) for r in runs},
                    key=lambda ab: (ab[1], ABLATION_ORDER.index(ab[0]) if ab[0] in ABLATION_ORDER else 99))
    backbones = sorted({b for _, b in combos})
    colour = {ab: _ablation_color(ab[0]) for ab in combos}
    labelled = set()
    last_epoch = dict.fromkeys(splits, 1)
    for r in runs:
        col = splits.index(r.split)
        for row, key in enumerate(("train/loss", "val/pck_0.2")):
            hist = sorted((m.step, m.value) for m in client.get_metric_history(r.run_id, key))
            if not hist:
                continue
            xs = [s + 1 for s, _ in hist]
            last_epoch[r.split] = max(last_epoch[r.split], xs[-1])
            ys = [v * (100.0 if key.startswith("val/") else 1.0) for _, v in hist]
            label = f"{r.ablation} ({BACKBONE_NAMES.get(r.backbone, r.backbone)})"
            style = "-" if r.status == "FINISHED" else "--"
            axes[row][col].plot(xs, ys, style, marker=_backbone_marker(r.backbone, backbones), markersize=3,
                                color=colour[(r.ablation, r.backbone)],
                                label=None if label in labelled else label)
            labelled.add(label)
    for col, k in enumerate(splits):
        axes[0][col].set_title(f"split {k}")
        axes[1][col].set_xlim(0.5, last_epoch[k] + 0.5)
        axes[1][col].set_xticks(range(1, last_epoch[k] + 1, max(1, math.ceil(last_epoch[k] / 10))))
        axes[1][col].set_xlabel("epoch")
        for row in range(2):
            axes[row][col].grid(alpha=0.3)
    axes[0][0].set_ylabel("train loss")
    axes[1][0].set_ylabel("val PCK@0.2 (%)")
    fig.suptitle("Training loss and validation PCK@0.2 per epoch (dashed: runs not finished: running or failed)",
                 fontsize=11)
    if labelled:
        fig.legend(loc="lower center", ncol=min(4, len(labelled)), fontsize=8)
        fig.tight_layout(rect=(0, 0.08, 1, 1))
    else:
        axes[0][0].text(0.5, 0.5, "no runs yet", ha="center", va="center", transform=axes[0][0].transAxes)
        fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# --- main -------------------------------------------------------------------------------------------


def main_backbone(data: Data, wanted: str | None) -> str:
    if wanted:
        return wanted
    counts: dict[str, int] = defaultdict(int)
    for r in data.finished + data.unfinished:
        counts[r.backbone] += 1
    if not counts or "swinv2_t" in counts:
        return "swinv2_t"
    return max(sorted(counts), key=lambda b: counts[b])


def build_tables(data: Data, with_paper: bool, main: str) -> list[Table]:
    tables = [
        table1(data, with_paper, main),
        ablation_table("table2", "Table 2: ablation of the module design", data, TABLE2_ROWS, PAPER_TABLE2,
                       with_paper, main),
        ablation_table("table3", "Table 3: multimodal input, baseline → +img → +img & cls", data, TABLE3_ROWS,
                       PAPER_TABLE3, with_paper, main),
        mpck_table(data),
        threshold_table(data),
    ]
    tables += [t for t in (table4(data, with_paper, main), table5(data, with_paper, main)) if t is not None]
    return tables


def report(args: argparse.Namespace) -> dict[str, Any]:
    from mlflow.tracking import MlflowClient

    uri = resolve_uri(args.tracking_uri)
    client = MlflowClient(uri)
    print(f"reading experiment {args.experiment!r} from {uri}"
          f"{'' if args.parent_run is None else f' (children of {args.parent_run})'}", flush=True)
    data = load(client, args.experiment, args.parent_run)
    main = main_backbone(data, args.backbone)
    print(f"{len(data.finished)} finished training runs, {len(data.unfinished)} not finished (left out of the "
          f"tables), {len(data.evals)} evaluation runs; Tables 2-5 use backbone {main}", flush=True)
    out = args.out or Path("report") / args.experiment
    out.mkdir(parents=True, exist_ok=True)
    tables = build_tables(data, args.with_paper, main)
    head = [f"# Report: experiment `{args.experiment}`", "",
            f"{len(data.finished)} finished training runs"
            + (f" of sweep parent run `{args.parent_run}`" if args.parent_run else "")
            + f"; {len(data.unfinished)} not finished yet (not in the tables). Cells are test PCK in %, "
              f"mean ± std over seeds where there are several; {DASH} where no run has finished.", ""]
    if args.with_paper:
        head += [f"Rows labelled _{PUBLISHED}_ are the numbers the CapeNext paper reports (real MP-100, "
                 "pretrained backbones and CLIP ViT-B/32); they are not produced by this code.", ""]
    md = "\n".join(head) + "\n" + "\n".join(t.markdown() for t in tables)
    plots = [plot_thresholds(data, out / "pck_vs_threshold.png"),
             plot_split_bars(data, out / "per_split_bars.png", main, args.with_paper),
             plot_curves(client, data, out / "curves.png")]
    md += "\n### Plots\n\n" + "\n".join(f"![{p.stem}]({p.name})" for p in plots) + "\n"
    (out / "report.md").write_text(md, encoding="utf-8")
    files = [out / "report.md"] + [t.write_csv(out) for t in tables] + [runs_csv(data, out)] + plots
    print(md)
    print("wrote " + ", ".join(str(f) for f in files), flush=True)
    return {"out": out, "tables": tables, "files": files, "data": data}


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("MPLBACKEND", "Agg")
    report(parse_args(argv))
    return 0


if __name__ == "__main__":
    run_main(main)
