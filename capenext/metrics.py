"""PCK, the MP-100 metric (paper Sec. 4.1: PCK@0.2, and PCK@0.05..0.25 with their mean).

A keypoint is correct when its distance to the ground truth, divided by max(w, h) of the query's
(cleaned) bounding box, is strictly below the threshold. Per sample, PCK is the fraction of correct
keypoints among those visible in both query and support; a sample with no such keypoint scores 0
(mmpose's ``keypoint_pck_accuracy`` marks it -1 and skips it; our protocol counts it as 0). Coordinates
are in original image pixels: predictions are mapped back through the inverse crop transform first.
"""

from __future__ import annotations

from typing import Sequence

import torch

from capenext.config import THRESHOLDS

__all__ = ["pck", "pck_per_sample"]


def pck_per_sample(pred: torch.Tensor, target: torch.Tensor, visible: torch.Tensor, norm: torch.Tensor,
                   thresholds: Sequence[float] = THRESHOLDS) -> torch.Tensor:
    """pred, target (B, N, 2) pixels; visible (B, N) bool; norm (B,) → (B, T) per-sample PCK."""
    dist = (pred.double() - target.double()).norm(dim=-1) / norm.double()[:, None]  # (B, N)
    thr = torch.as_tensor(thresholds, dtype=torch.float64, device=dist.device)  # (T,)
    vis = visible.bool()[..., None]  # (B, N, 1)
    correct = ((dist[..., None] < thr) & vis).sum(1).double()  # (B, T)
    count = vis.sum(1).double()  # (B, 1)
    return torch.where(count > 0, correct / count.clamp(min=1), torch.zeros_like(correct))  # 0 if none visible


def pck(pred: torch.Tensor, target: torch.Tensor, visible: torch.Tensor, norm: torch.Tensor,
        thresholds: Sequence[float] = THRESHOLDS) -> dict:
    """``{thr: mean over samples of the per-sample PCK, ..., "mean": mean over thresholds}`` (floats).

    Args:
        pred, target: (B, N, 2) keypoints in original image pixels.
        visible: (B, N) bool, query visible AND support visible (annotation visibility).
        norm: (B,) max(w, h) of the cleaned query bbox.
        thresholds: distances are compared with ``thr * norm`` (strictly below).
    """
    per = pck_per_sample(pred, target, visible, norm, thresholds).mean(0)  # (T,)
    result: dict = {float(t): float(v) for t, v in zip(thresholds, per)}
    result["mean"] = float(per.mean())
    return result
