"""PCK, the MP-100 metric (paper Sec. 4.1: PCK@0.2, and PCK@0.05..0.25 with their mean), and the protocol
around it, defined once: the thresholds, the normaliser, the metric names, the accumulator that every
evaluation (validation, test, ``jobs.evaluate``) uses, and the episode seeds.

A keypoint is correct when its distance to the ground truth, divided by max(w, h) of the query's
(cleaned) bounding box (:func:`pck_norm`), is strictly below the threshold. Per sample, PCK is the
fraction of correct keypoints among those visible in both query and support; a sample with no such
keypoint scores 0 and counts in the mean, as the reference's evaluation does (mmpose 0.29's
``keypoint_pck_accuracy`` returns 0 accuracy for it and the reference averages over every sample).
Coordinates are in original image pixels: predictions are mapped back through the inverse crop first.

Names: ``pck_0.2`` (the paper's PCK@0.2; MLflow forbids ``@``) and ``pck_mean``, under a prefix:
``train/``, ``val/``, ``test/`` for the model, ``floor/`` for the per-name mean-position floor
(:mod:`capenext.baselines`).
"""

from __future__ import annotations

from typing import Sequence

import torch

from capenext.config import THRESHOLDS

__all__ = ["THRESHOLDS", "VAL_THRESHOLDS", "FLOOR", "pck", "pck_per_sample", "pck_key",
           "metric_keys", "pck_norm", "episode_seed", "PCKAccumulator"]

VAL_THRESHOLDS = (0.2,)  # validation reports PCK@0.2 only
FLOOR = "floor"  # prefix of the mean-position floor's metrics
MEAN = "pck_mean"
# episode seeds relative to the run's optim.seed: validation and test draw different episodes
EPISODE_SEED_OFFSET = {"val": 1, "test": 2}


def pck_key(thr: float) -> str:
    """Metric name of PCK at ``thr``: ``pck_0.2``."""
    return f"pck_{thr:g}"


def metric_keys(prefix: str | None = None, thresholds: Sequence[float] = THRESHOLDS, mean: bool = True) -> list[str]:
    """``[prefix/pck_0.05, ..., prefix/pck_0.25, prefix/pck_mean]`` (no prefix: the bare names)."""
    names = [pck_key(t) for t in thresholds] + ([MEAN] if mean else [])
    return [f"{prefix}/{n}" for n in names] if prefix else names


def episode_seed(run_seed: int, subset: str) -> int:
    """The seed of a subset's evaluation episodes for a run seeded ``run_seed`` (``val``: +1, ``test``: +2)."""
    return run_seed + EPISODE_SEED_OFFSET[subset]


def pck_norm(bbox: Sequence[float]) -> float:
    """PCK's normaliser: max(w, h) of the cleaned query box ``(x, y, w, h)``."""
    return float(max(bbox[2], bbox[3]))


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


class PCKAccumulator:
    """Sums per-sample PCK over batches (and, with :meth:`all_reduce`, over ranks); :meth:`result` gives
    ``{"pck_0.05": ..., ..., "pck_mean": ..., "count": n}``, the mean being over the thresholds."""

    def __init__(self, thresholds: Sequence[float] = THRESHOLDS):
        self.thresholds = tuple(thresholds)
        self.sums = torch.zeros(len(self.thresholds) + 1, dtype=torch.float64)  # per threshold, then count

    def update(self, pred: torch.Tensor, target: torch.Tensor, visible: torch.Tensor, norm: torch.Tensor
               ) -> torch.Tensor:
        """Add a batch; returns its (B, T) per-sample PCK."""
        per_sample = pck_per_sample(pred, target, visible, norm, self.thresholds)  # (B, T)
        self.sums[:-1] += per_sample.sum(0).cpu()
        self.sums[-1] += len(pred)
        return per_sample

    def all_reduce(self, device: torch.device) -> None:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            sums = self.sums.to(device)
            dist.all_reduce(sums)
            self.sums = sums.cpu()

    def result(self) -> dict[str, float]:
        count = max(float(self.sums[-1]), 1.0)
        out = {pck_key(t): float(self.sums[i]) / count for i, t in enumerate(self.thresholds)}
        out[MEAN] = sum(out.values()) / len(self.thresholds)
        out["count"] = float(self.sums[-1])
        return out
