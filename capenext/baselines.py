"""A floor for PCK: each keypoint name predicted at its mean crop position over the train categories.

Any text-guided CAPE model must beat this on unseen categories to show it reads the image: the baseline
uses the names alone (a "left eye" tends to sit up and left in the crop). Positions are taken in the
un-augmented top-down crop, in [0, 1] coordinates; a name never seen in training gets the mean of every
training keypoint. :class:`MeanPositionModel` answers like the model (``points`` (1, B, K, 2)), so
:func:`capenext.engine.evaluate` scores it on the very same test episodes.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import torch
from torch import nn

from capenext.config import DataCfg
from capenext.data.mp100 import Category, Subset
from capenext.data.transforms import affine_matrix, apply_affine, box_center_scale


def mean_positions(train: Subset, cfg: DataCfg) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Keypoint text → mean (x, y) in [0, 1] crop coordinates over visible training keypoints, and the
    overall mean."""
    sums: dict[str, list] = defaultdict(list)
    for s in train.samples:
        center, side = box_center_scale(s.bbox, cfg.bbox_scale)
        xy = apply_affine(s.keypoints[:, :2].astype(np.float64), affine_matrix(center, side, 0.0, 1))
        for name, p, v in zip(train.categories[s.category_id].keypoints, xy, s.visible):
            if v:
                sums[name].append(p)
    means = {name: np.mean(pts, axis=0) for name, pts in sums.items()}
    overall = np.mean(np.concatenate([np.asarray(p) for p in sums.values()]), axis=0) if sums else np.full(2, 0.5)
    return means, overall


class MeanPositionModel(nn.Module):
    """Predicts every keypoint of a category at its name's mean training position."""

    def __init__(self, train: Subset, categories: dict[int, Category], cfg: DataCfg):
        super().__init__()
        means, overall = mean_positions(train, cfg)
        self.table = {
            cid: torch.tensor(np.stack([means.get(n, overall) for n in cat.keypoints]), dtype=torch.float32)
            for cid, cat in categories.items()
        }
        self.slots = cfg.max_keypoints
        self.seen = sum(n in means for c in categories.values() for n in c.keypoints)
        self.total = sum(c.num_keypoints for c in categories.values())

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        cats = batch["category_id"].tolist()
        points = torch.full((len(cats), self.slots, 2), 0.5)
        for i, c in enumerate(cats):
            points[i, : len(self.table[c])] = self.table[c]
        return {"points": points.unsqueeze(0).to(batch["img"].device)}  # (1, B, K, 2)
