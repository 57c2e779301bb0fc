"""The report's plots (matplotlib, Agg backend), drawn from plain numbers that :mod:`jobs.report` computes.

* :func:`plot_thresholds` — PCK against threshold, one line per (ablation, backbone), the floor dashed;
* :func:`plot_split_bars` — PCK@0.2 per split and Avg, one bar per ablation, published values as ×;
* :func:`plot_curves` — training loss and val PCK@0.2 per epoch, one column per split.

Every ablation has one colour in every plot (its place in ``order``), every backbone one marker.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

DASH = "—"


@dataclass
class Line:
    """One line of the threshold plot: the means and stds (in %, NaN where missing) at each threshold.
    ``ablation`` is empty for the mean-position floor, drawn dashed in grey."""

    label: str
    ablation: str
    backbone: str
    means: list[float]
    stds: list[float]


@dataclass
class Bars:
    """One ablation's bars: means and stds (in %, NaN where no run) per split and Avg, and the published
    values at the same places (empty when the paper has none)."""

    ablation: str
    means: list[float]
    stds: list[float]
    published: Sequence[float] = ()


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
        err = _zero(ln.stds[: len(xs)])
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
    ax.set_title("Test PCK against threshold (mean over splits)")
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
        err = _zero(b.stds)
        ax.bar(xs, _zero(b.means), width * 0.95, yerr=err if any(err) else None, capsize=2,
               color=ablation_color(b.ablation, order), label=b.ablation)
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
    ax.set_title(f"PCK@0.2 per split and ablation (backbone {backbone_label})")
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
