"""capenext.viz: keypoints, names and skeleton on an image; the best/worst grid of predictions vs truth."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from capenext.viz import Panel, best_and_worst, draw_keypoints, palette, prediction_grid, save_figure, to_rgb


def _gray(h: int = 100, w: int = 160) -> np.ndarray:
    return np.full((h, w, 3), 90, np.uint8)


def test_small_images_are_upscaled_and_points_land_where_they_belong():
    points = np.array([[20.0, 30.0], [120.0, 70.0]])
    im = draw_keypoints(_gray(), points, min_side=400)
    assert im.size == (640, 400) and im.mode == "RGB"  # x4: short side 100 → 400
    a = np.asarray(im)
    for (x, y), color in zip(points, palette(2)):
        assert tuple(a[round((y + 0.5) * 4 - 0.5), round((x + 0.5) * 4 - 0.5)]) == color
    assert draw_keypoints(_gray(600, 800), points).size == (800, 600)  # never downscaled


def test_skeleton_names_and_hidden_points():
    img = _gray()
    points = np.array([[20.0, 50.0], [140.0, 50.0], [80.0, 20.0]])
    bare = np.asarray(draw_keypoints(img, points, min_side=100)).astype(int)
    with_edge = np.asarray(draw_keypoints(img, points, skeleton=[(0, 1)], min_side=100)).astype(int)
    assert (with_edge[50, 80] != bare[50, 80]).any()  # the edge's midpoint is drawn
    named = np.asarray(draw_keypoints(img, points, names=["a", "b", "c"], min_side=100)).astype(int)
    assert (named != bare).sum() > 50  # labels drawn
    hidden = np.asarray(draw_keypoints(img, points, visible=[True, True, False], skeleton=[(0, 2)],
                                       min_side=100)).astype(int)
    assert (hidden[20, 80] == 90).all()  # the hidden point and its edge are not drawn
    assert (hidden[50:, :] == bare[50:, :]).all()


def test_to_rgb_accepts_pil_gray_rgba_and_rejects_other_arrays():
    assert to_rgb(Image.new("L", (4, 3))).shape == (3, 4, 3)
    assert to_rgb(np.zeros((3, 4), np.uint8)).shape == (3, 4, 3)
    assert to_rgb(np.zeros((3, 4, 4), np.uint8)).shape == (3, 4, 3)
    with pytest.raises(ValueError, match="uint8"):
        to_rgb(np.zeros((3, 4, 3), np.float32))


def test_best_and_worst_rank_by_threshold_dedupe_queries_and_never_overlap():
    recs = [
        {"ann_id": 1, "category_id": 7, "pck": [0.1, 0.9]},
        {"ann_id": 2, "category_id": 7, "pck": [0.1, 0.2]},
        {"ann_id": 1, "category_id": 7, "pck": [0.0, 0.0]},  # same query, later episode: ignored
        {"ann_id": 3, "category_id": 7, "pck": [0.5, 0.5]},
        {"ann_id": 4, "category_id": 8, "pck": [0.3, 0.3]},
    ]
    picked = best_and_worst(recs, n=2, index=1)
    assert picked[7] == ([0, 3], [1])  # best: ann 1 (0.9), ann 3 (0.5); worst: ann 2 only (no overlap)
    assert picked[8] == ([4], [])


def test_prediction_grid_writes_a_png_with_one_row_per_category(tmp_path):
    rng = np.random.default_rng(0)
    gt = rng.uniform(20, 80, (5, 2))

    def panel(shift: float) -> Panel:
        return Panel(image=rng.integers(0, 255, (100, 120, 3), dtype=np.uint8), pred=gt + shift, gt=gt,
                     visible=np.array([1, 1, 1, 0, 1], bool), skeleton=[(0, 1), (1, 2)], box=(10, 10, 80, 80),
                     title=f"shift {shift}")

    fig = prediction_grid([("cat", [panel(0), panel(5), panel(20), None]), ("chair", [panel(1), None, None, None])],
                          ["best 1", "best 2", "worst 1", "worst 2"], title="grid")
    assert len(fig.axes) == 8
    path = save_figure(fig, tmp_path / "sub" / "grid.png", dpi=50)
    with Image.open(path) as im:
        assert im.format == "PNG"
        assert im.size == (round(fig.get_figwidth() * 50), round(fig.get_figheight() * 50))
        assert im.height > im.width / 4 * 2 * 0.8  # two rows of roughly square panels
