"""The report's plots (matplotlib, Agg backend), drawn from plain numbers that :mod:`jobs.report` computes.

* :func:`plot_thresholds` — PCK against threshold, one line per (ablation, backbone), the floor dashed;
* :func:`plot_split_bars` — PCK@0.2 per split and Avg, one bar per ablation, published values as ×;
* :func:`plot_curves` — training loss and val PCK@0.2 per epoch, one column per split;
* :func:`plot_seeds` — mean PCK@0.2 per split with its 95 % interval over seeds, and the paired differences
  against ``full`` with theirs, a zero line.

Every ablation has one colour in every plot (its place in ``order``), every backbone (in :func:`plot_seeds`,
every text encoder) one marker. Error bars are half-widths of the 95 % t-interval over seeds (none for one seed).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

DASH = "—"


@dataclass
class Line:
    """One line of the threshold plot: the means and 95 % half-widths (in %, NaN where missing) at each
    threshold. ``ablation`` is empty for the mean-position floor, drawn dashed in grey."""

    label: str
    ablation: str
    backbone: str
    means: list[float]
    halves: list[float]


@dataclass
class Bars:
    """One row's bars (an ablation, or an ablation and text encoder): means and 95 % half-widths (in %, NaN
    where no run) per split and Avg, and the published values at the same places (empty when the paper has
    none)."""

    label: str
    ablation: str
    means: list[float]
    halves: list[float]
    published: Sequence[float] = ()


@dataclass
class Interval:
    """One series of :func:`plot_seeds`: a mean and its 95 % half-width (in %, NaN where missing; a NaN
    half-width: one seed, no bar) per group. ``variant`` (a text encoder, or "") picks the marker."""

    label: str
    ablation: str
    variant: str
    means: list[float]
    halves: list[float]


@dataclass
class Curve:
    """One run's per-epoch history: (step, value) of ``train/loss`` and of ``val/pck_0.2`` (a fraction)."""

    split: int
    ablation: str
    backbone: str
    label: str  # legend text, shared by the runs of one (ablation, backbone)
    finished: bool
    loss: list[tuple[int, float]] = field(default_factory=list)
    val: list[tuple[int, float]] = field(default_factory=list)


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _color(i: int):
    return _plt().get_cmap("tab10")(i % 10)


def ablation_color(ablation: str, order: Sequence[str]):
    """One colour per ablation, the same in every plot."""
    if ablation in order:
        return _color(list(order).index(ablation))
    return _color(len(order) + sum(map(ord, ablation)) % 3)


def _marker(backbone: str, backbones: list[str]) -> str:
    return "os^Dv<>p"[backbones.index(backbone) % 8] if backbone in backbones else "o"


def _zero(values: Sequence[float]) -> list[float]:
    return [0.0 if math.isnan(v) else v for v in values]


def _save(fig, plt, path: Path, dpi: int) -> Path:
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path


def plot_thresholds(path: Path, thresholds: Sequence[float], lines: list[Line], order: Sequence[str]) -> Path:
    """PCK against threshold, one line per (ablation, backbone), the mean-position floor dashed."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    xs = list(thresholds)
    backbones = sorted({ln.backbone for ln in lines if ln.ablation})
    for ln in lines:
        ys = ln.means[: len(xs)]
        err = _zero(ln.halves[: len(xs)])
        if ln.ablation:
            ax.errorbar(xs, ys, yerr=err if any(err) else None, marker=_marker(ln.backbone, backbones),
                        capsize=3, color=ablation_color(ln.ablation, order), label=ln.label)
        else:
            ax.plot(xs, ys, "--", color="0.4", marker="x", label=ln.label)
    if not lines:
        ax.text(0.5, 0.5, "no finished runs yet", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel("PCK threshold (fraction of the bounding-box size)")
    ax.set_ylabel("test PCK (%)")
    ax.set_xticks(xs)
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    ax.set_title("Test PCK against threshold (mean over splits; error bars: 95% interval over seeds)", fontsize=10)
    if lines:
        ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    return _save(fig, plt, path, 120)


def plot_split_bars(path: Path, groups: list[str], bars: list[Bars], order: Sequence[str], backbone: str,
                    backbone_label: str, published_label: str) -> Path:
    """One group per split (and Avg), one bar per ablation of ``backbone``; published values as ×."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(11, 4.5))
    width = 0.8 / max(1, len(bars))
    marked = False
    for i, b in enumerate(bars):
        xs = [g + (i - (len(bars) - 1) / 2) * width for g in range(len(groups))]
        err = _zero(b.halves)
        ax.bar(xs, _zero(b.means), width * 0.95, yerr=err if any(err) else None, capsize=2,
               color=ablation_color(b.ablation, order), label=b.label)
        for x, m in zip(xs, b.means):
            if math.isnan(m):
                ax.text(x, 1, DASH, ha="center", va="bottom", fontsize=8, color="0.3")
        if b.published:
            ax.plot(xs, list(b.published), "kx", markersize=6, label=None if marked else published_label)
            marked = True
    if not bars:
        ax.text(0.5, 0.5, f"no finished runs with backbone {backbone} yet", ha="center", va="center",
                transform=ax.transAxes)
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels(groups)
    ax.set_ylabel("test PCK@0.2 (%)")
    ax.set_ylim(0, 100)
    ax.grid(axis="y", alpha=0.3)
    ax.set_title(f"PCK@0.2 per split and ablation (backbone {backbone_label}; error bars: 95% interval over seeds)",
                 fontsize=11)
    if bars:  # outside the axes: the published markers sit near the top
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    return _save(fig, plt, path, 120)


def plot_curves(path: Path, curves: list[Curve], order: Sequence[str]) -> Path:
    """Training loss and val PCK@0.2 per epoch; one column per split, one colour per ablation (a marker per
    backbone); runs not finished (running, failed) dashed."""
    plt = _plt()
    splits = sorted({c.split for c in curves}) or [1]
    fig, axes = plt.subplots(2, len(splits), figsize=(4.2 * len(splits), 6.5), squeeze=False, sharex="col")
    backbones = sorted({c.backbone for c in curves})
    labelled = set()
    last_epoch = dict.fromkeys(splits, 1)
    for c in curves:
        col = splits.index(c.split)
        for row, (hist, scale) in enumerate(((c.loss, 1.0), (c.val, 100.0))):
            hist = sorted(hist)
            if not hist:
                continue
            xs = [s + 1 for s, _ in hist]
            last_epoch[c.split] = max(last_epoch[c.split], xs[-1])
            axes[row][col].plot(xs, [v * scale for _, v in hist], "-" if c.finished else "--",
                                marker=_marker(c.backbone, backbones), markersize=3,
                                color=ablation_color(c.ablation, order),
                                label=None if c.label in labelled else c.label)
            labelled.add(c.label)
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
    return _save(fig, plt, path, 110)


def _interval_panel(ax, groups: list[str], series: list[Interval], order: Sequence[str]) -> None:
    """One point per group and series, side by side within a group, with its interval as an error bar."""
    variants = sorted({s.variant for s in series})
    width = 0.8 / max(1, len(series))
    for i, s in enumerate(series):
        xs = [g + (i - (len(series) - 1) / 2) * width for g in range(len(groups))]
        err = _zero(s.halves)
        ax.errorbar(xs, s.means, yerr=err if any(err) else None, fmt=_marker(s.variant, variants), capsize=3,
                    linestyle="none", color=ablation_color(s.ablation, order), label=s.label)
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels(groups)
    ax.set_xlim(-0.6, len(groups) - 0.4)
    ax.grid(axis="y", alpha=0.3)


def plot_seeds(path: Path, groups: list[str], cells: list[Interval], diffs: list[Interval], order: Sequence[str],
               backbone_label: str, reference: str) -> Path:
    """Left: mean test PCK@0.2 per split (and Avg) with its 95 % interval over seeds, per ablation (and text
    encoder). Right: the paired differences ablation - ``reference`` with their intervals, and a zero line."""
    plt = _plt()
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 4.8))
    _interval_panel(left, groups, cells, order)
    _interval_panel(right, groups, diffs, order)
    right.axhline(0.0, color="0.2", linewidth=1)
    left.set_ylabel("test PCK@0.2 (%)")
    left.set_title(f"Mean over seeds, 95% t-interval (backbone {backbone_label})", fontsize=10)
    right.set_ylabel(f"ablation − {reference} (percentage points)")
    right.set_title(f"Paired differences vs {reference}, seed by seed, 95% t-interval", fontsize=10)
    for ax, series, empty in ((left, cells, f"no finished runs with backbone {backbone_label} yet"),
                              (right, diffs, f"no seeds shared with {reference} yet")):
        if series:
            ax.legend(fontsize=8, loc="best")
        else:
            ax.text(0.5, 0.5, empty, ha="center", va="center", transform=ax.transAxes)
    fig.tight_layout()
    return _save(fig, plt, path, 120)
