"""Pictures of keypoints: one prediction on an image, and a grid of predictions against ground truth.

Two pure functions (PIL and matplotlib's object API, no pyplot state, no Ray, no MLflow):

* :func:`draw_keypoints` draws points, their names (and scores) and the skeleton on an image and returns
  a PIL image; ``jobs.predict`` writes it. Small images are upscaled first (``min_side``) so that the
  names stay readable; coordinates are in the *original* image's pixels either way.
* :func:`prediction_grid` lays out :class:`Panel` s (one query each: the image around its box, ground
  truth in green, prediction in red, a grey line from each prediction to its ground truth) as a
  matplotlib ``Figure``: one row per category, the best then the worst samples as columns.
  :func:`best_and_worst` picks them from the per-query records of :func:`capenext.engine.evaluate`;
  ``jobs.evaluate`` draws the grid and logs it with each evaluation run.
"""

from __future__ import annotations

import colorsys
import textwrap
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

__all__ = ["Panel", "best_and_worst", "draw_keypoints", "palette", "prediction_grid", "save_figure", "to_rgb"]

GT_COLOR = "#2ca02c"  # green
PRED_COLOR = "#d62728"  # red


def to_rgb(image: np.ndarray | Image.Image) -> np.ndarray:
    """PIL image or (H, W), (H, W, 3), (H, W, 4) uint8 array → (H, W, 3) uint8 RGB array."""
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"))
    a = np.asarray(image)
    if a.dtype != np.uint8 or a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[2] not in (3, 4)):
        raise ValueError(f"image array must be (H, W, 3) uint8 (or (H, W) / (H, W, 4)), got {a.shape} {a.dtype}")
    if a.ndim == 2:
        return np.repeat(a[:, :, None], 3, axis=2)
    return np.ascontiguousarray(a[:, :, :3])


def palette(n: int) -> list[tuple[int, int, int]]:
    """``n`` well-separated saturated RGB colours (golden-ratio hue steps), the same for the same ``n``."""
    out = []
    for i in range(n):
        r, g, b = colorsys.hsv_to_rgb((i * 0.618033988749895) % 1.0, 0.85, 1.0)
        out.append((int(r * 255), int(g * 255), int(b * 255)))
    return out


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)  # Pillow >= 10.1: a scalable font
    except TypeError:  # older Pillow: the fixed bitmap font
        return ImageFont.load_default()


def draw_keypoints(
    image: np.ndarray | Image.Image,
    points: np.ndarray | Sequence[Sequence[float]],
    names: Sequence[str] | None = None,
    skeleton: Sequence[tuple[int, int]] | None = None,
    scores: Sequence[float] | None = None,
    visible: Sequence[bool] | None = None,
    bbox: tuple[float, float, float, float] | None = None,
    min_side: int = 512,
    inside: Sequence[bool] | None = None,
) -> Image.Image:
    """Draw keypoints, their names and the skeleton on ``image``.

    Args:
        image: (H, W, 3) uint8 array or PIL image.
        points: (K, 2) (x, y) in image pixels.
        names: K labels written beside the points (with ``scores``: ``"name 0.87"``).
        skeleton: 0-based index pairs; an edge is drawn when both ends are visible.
        scores: K confidences in [0, 1]; a point's disc is drawn smaller when its score is low.
        visible: K bools; hidden points are not drawn (default: all drawn).
        bbox: optional (x, y, w, h) drawn as a thin white rectangle (the box the model looked at).
        min_side: the picture is upscaled (bicubic) until its short side is at least this, so text is
            readable on small images; never downscaled.
        inside: K bools; a point with ``False`` was predicted off the image and clamped to its edge
            (:class:`capenext.predict.Predictor`'s ``inside_image``): drawn as a hollow ring, not a disc
            (default: every point on the image).
    Returns:
        an RGB PIL image of size (W * f, H * f), f = max(1, min_side / min(H, W)).
    """
    rgb = to_rgb(image)
    pts = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    k = len(pts)
    show = np.ones(k, bool) if visible is None else np.asarray(visible, bool)
    h, w = rgb.shape[:2]
    f = max(1.0, min_side / max(1, min(h, w)))
    im = Image.fromarray(rgb)
    if f > 1.0:
        im = im.resize((round(w * f), round(h * f)), Image.BICUBIC)
    draw = ImageDraw.Draw(im)
    side = min(im.size)
    radius = max(3, round(side / 110))
    width = max(2, round(side / 250))
    font = _font(max(11, round(side / 40)))
    xy = (pts + 0.5) * f - 0.5  # pixel centres stay on pixel centres through the resize
    colors = palette(k)
    if bbox is not None:
        x, y, bw, bh = (float(v) * f for v in bbox)
        draw.rectangle([x, y, x + bw, y + bh], outline=(255, 255, 255), width=max(1, width // 2))
    for a, b in skeleton or ():
        if 0 <= a < k and 0 <= b < k and show[a] and show[b]:
            mix = tuple((ca + cb) // 2 for ca, cb in zip(colors[a], colors[b]))
            draw.line([tuple(xy[a]), tuple(xy[b])], fill=(0, 0, 0), width=width + 2)
            draw.line([tuple(xy[a]), tuple(xy[b])], fill=mix, width=width)
    on_image = np.ones(k, bool) if inside is None else np.asarray(inside, bool)
    for j in np.flatnonzero(show):
        r = radius if scores is None else radius * (0.6 + 0.6 * float(np.clip(scores[j], 0, 1)))
        x, y = xy[j]
        if on_image[j]:
            draw.ellipse([x - r, y - r, x + r, y + r], fill=colors[j], outline=(0, 0, 0), width=max(1, width // 2))
        else:  # off the image, clamped to its edge: a hollow ring in the point's colour, outlined in black
            ring = max(2, width)
            r = max(r, radius) + ring
            draw.ellipse([x - r - 1, y - r - 1, x + r + 1, y + r + 1], outline=(0, 0, 0), width=ring + 2)
            draw.ellipse([x - r, y - r, x + r, y + r], outline=colors[j], width=ring)
    if names is not None:
        stroke = max(1, width // 2 + 1)
        placed: list[tuple[float, float, float, float]] = []
        for j in np.flatnonzero(show):
            label = str(names[j]) if scores is None else f"{names[j]} {float(scores[j]):.2f}"
            pos = _place_label(draw, label, font, stroke, xy[j], radius + 2, im.size, placed)
            draw.text(pos, label, fill=colors[j], font=font, stroke_width=stroke, stroke_fill=(0, 0, 0))
    return im


def _overlap(a: tuple[float, float, float, float], b: tuple[float, float, float, float]) -> float:
    w = min(a[2], b[2]) - max(a[0], b[0])
    h = min(a[3], b[3]) - max(a[1], b[1])
    return max(0.0, w) * max(0.0, h)


def _place_label(draw: ImageDraw.ImageDraw, label: str, font, stroke: int, point: np.ndarray, gap: float,
                 size: tuple[int, int], placed: list) -> tuple[float, float]:
    """Top-left corner for ``label`` beside ``point``: the first of right-above, right-below, left-above,
    left-below (then above, below) that stays inside the image and clear of the labels already
    ``placed``; else the one overlapping them least. Appends the chosen box to ``placed``."""
    l, t, r, b = draw.textbbox((0, 0), label, font=font, stroke_width=stroke)
    tw, th = r - l, b - t
    x, y = float(point[0]), float(point[1])
    candidates = [(x + gap, y - gap - th), (x + gap, y + gap), (x - gap - tw, y - gap - th), (x - gap - tw, y + gap),
                  (x - tw / 2, y - 2 * gap - th), (x - tw / 2, y + 2 * gap)]
    best, best_cost = None, None
    for cx, cy in candidates:
        cx = min(max(cx, 0.0), max(0.0, size[0] - tw))  # keep inside the picture
        cy = min(max(cy, 0.0), max(0.0, size[1] - th))
        box = (cx, cy, cx + tw, cy + th)
        cost = sum(_overlap(box, other) for other in placed)
        if best_cost is None or cost < best_cost:
            best, best_cost = box, cost
        if cost == 0:
            break
    placed.append(best)
    return best[0] - l, best[1] - t


@dataclass
class Panel:
    """One query for :func:`prediction_grid`.

    image (H, W, 3) uint8; pred, gt (K, 2) image pixels; visible (K,) bool (scored keypoints, the
    others are not drawn); box (x, y, w, h) region shown (e.g. the padded query box; default whole
    image); title above the panel.
    """

    image: np.ndarray
    pred: np.ndarray
    gt: np.ndarray
    visible: np.ndarray
    skeleton: Sequence[tuple[int, int]] = ()
    box: tuple[float, float, float, float] | None = None
    title: str = ""
    names: Sequence[str] = field(default_factory=tuple)


def best_and_worst(records: list[dict], n: int, index: int) -> dict[int, tuple[list[int], list[int]]]:
    """Per category, the positions (into ``records``) of the ``n`` best and ``n`` worst distinct queries.

    Args:
        records: dicts with ``ann_id``, ``category_id`` and ``pck`` (a list per threshold), as
            :func:`capenext.engine.evaluate` keeps them; a query seen in several episodes counts once
            (its first record).
        n: samples per side; a category with fewer than ``2 n`` distinct queries gets fewer worst ones
            (no query is both best and worst).
        index: which threshold of ``pck`` ranks (ties: the mean over thresholds, then the annotation id).
    Returns:
        ``{category_id: (best, worst)}``, best first in ``best``, worst first in ``worst``.
    """
    first: dict[tuple[int, int], int] = {}
    for i, r in enumerate(records):
        first.setdefault((int(r["category_id"]), int(r["ann_id"])), i)
    by_cat: dict[int, list[int]] = defaultdict(list)
    for (cat, _), i in first.items():
        by_cat[cat].append(i)
    out = {}
    for cat in sorted(by_cat):
        ranked = sorted(by_cat[cat], key=lambda i: (-records[i]["pck"][index], -float(np.mean(records[i]["pck"])),
                                                    records[i]["ann_id"]))
        best = ranked[:n]
        worst = [i for i in reversed(ranked) if i not in best][:n]
        out[cat] = (best, worst)
    return out


def _draw_panel(ax, p: Panel) -> None:
    ax.imshow(p.image, interpolation="bilinear")
    vis = np.asarray(p.visible, bool)
    pred, gt = np.asarray(p.pred, float), np.asarray(p.gt, float)
    for a, b in p.skeleton:
        if a < len(vis) and b < len(vis) and vis[a] and vis[b]:
            ax.plot(gt[[a, b], 0], gt[[a, b], 1], color=GT_COLOR, lw=1.2, alpha=0.8)
            ax.plot(pred[[a, b], 0], pred[[a, b], 1], color=PRED_COLOR, lw=1.2, alpha=0.8)
    for j in np.flatnonzero(vis):
        ax.plot([gt[j, 0], pred[j, 0]], [gt[j, 1], pred[j, 1]], color="0.85", lw=0.8, alpha=0.9)
    ax.scatter(gt[vis, 0], gt[vis, 1], s=22, c=GT_COLOR, edgecolors="black", linewidths=0.5, zorder=3)
    ax.scatter(pred[vis, 0], pred[vis, 1], s=30, c=PRED_COLOR, marker="X", edgecolors="black", linewidths=0.5,
               zorder=4)
    h, w = p.image.shape[:2]
    x, y, bw, bh = p.box if p.box is not None else (0, 0, w, h)
    ax.set_xlim(x, x + bw)
    ax.set_ylim(y + bh, y)  # image coordinates: y down
    ax.set_title(p.title, fontsize=8)
    ax.set_xticks([])
    ax.set_yticks([])


def prediction_grid(rows: Sequence[tuple[str, Sequence[Panel | None]]], column_titles: Sequence[str] = (),
                    title: str = "", panel_inches: float = 2.2):
    """A grid of predictions (red X) against ground truth (green dots), one row per category.

    Args:
        rows: ``(row label, panels)``; ``None`` leaves a cell empty (a category with few queries).
        column_titles: written above the first row (e.g. "best 1", ..., "worst 1").
        title: the figure's title.
        panel_inches: side of one cell.
    Returns:
        a ``matplotlib.figure.Figure`` (Agg canvas attached); write it with :func:`save_figure`.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    n_rows = max(1, len(rows))
    n_cols = max([1, len(column_titles)] + [len(p) for _, p in rows])
    width = max(panel_inches * n_cols + 0.6, 4.5)
    lines = textwrap.wrap(title, max(20, int(width * 11))) if title else []
    top, bottom = 0.25 + 0.2 * len(lines), 0.35  # inches for the title lines and the legend
    height = (panel_inches + 0.3) * n_rows + top + bottom
    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)
    axes = fig.subplots(n_rows, n_cols, squeeze=False)
    for r, (label, panels) in enumerate(rows):
        for c in range(n_cols):
            ax = axes[r][c]
            p = panels[c] if c < len(panels) else None
            if p is None:  # empty cell; keep the axes so a row label still shows
                ax.set_xticks([])
                ax.set_yticks([])
                for spine in ax.spines.values():
                    spine.set_visible(False)
                continue
            _draw_panel(ax, p)
            if r == 0 and c < len(column_titles):
                ax.set_title(f"{column_titles[c]}\n{p.title}", fontsize=8)
        axes[r][0].set_ylabel(label, fontsize=9)
    handles = [Line2D([], [], color=GT_COLOR, marker="o", ls="-", label="ground truth"),
               Line2D([], [], color=PRED_COLOR, marker="X", ls="-", label="prediction")]
    fig.legend(handles=handles, loc="lower center", fontsize=8, frameon=False, ncol=2)
    if lines:
        fig.suptitle("\n".join(lines), fontsize=10, x=0.02, y=1 - 0.08 / height, ha="left", va="top")
    fig.tight_layout(rect=(0, bottom / height, 0.99, 1 - top / height))
    return fig


def save_figure(fig, path: str | Path, dpi: int = 110) -> Path:
    """Write a figure of :func:`prediction_grid` as PNG (parents created); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi, format="png")
    return path
