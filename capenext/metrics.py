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

Per-group PCK, to test the paper's claim that the class prompt resolves polysemous keypoint names (a
chair's "leg" is not a horse's): where a category lists polysemous keypoints (``Category.polysemous``, the
synthetic set's ``polysemous_keypoints``), the accumulator also reports keypoint-level PCK over two groups,
``polysemous`` (the listed keypoints) and ``unambiguous`` (the others): at each threshold, the correct
keypoints of the group over its keypoints, counting the keypoints the per-sample PCK counts (visible in
query and support) over all pairs, so a pair weighs by its keypoints in the group. Names
``polysemous/pck_0.05`` … ``polysemous/pck_0.25``, ``polysemous/pck_mean`` and ``polysemous/keypoints``
(the count; a group without keypoints scores 0), the same under ``unambiguous/``; absent when no category
of the evaluated subset lists one (MP-100), so those results keep their keys.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch

from capenext.config import THRESHOLDS

__all__ = ["FLOOR", "GROUPS", "THRESHOLDS", "VAL_THRESHOLDS", "PCKAccumulator", "episode_seed", "metric_keys", "pck",
           "pck_key", "pck_norm", "pck_per_sample", "polysemy_groups"]

VAL_THRESHOLDS = (0.2,)  # validation reports PCK@0.2 only
FLOOR = "floor"  # prefix of the mean-position floor's metrics
MEAN = "pck_mean"
GROUPS = ("polysemous", "unambiguous")  # the keypoint-level groups, in the order their sums are kept
KEYPOINTS = "keypoints"  # a group's count of scored keypoints
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


def _correct(pred: torch.Tensor, target: torch.Tensor, norm: torch.Tensor, thresholds: Sequence[float]
             ) -> torch.Tensor:
    """(B, N, T) bool: each keypoint's normalised distance strictly below each threshold (visible or not)."""
    dist = (pred.double() - target.double()).norm(dim=-1) / norm.double()[:, None]  # (B, N)
    thr = torch.as_tensor(thresholds, dtype=torch.float64, device=dist.device)  # (T,)
    return dist[..., None] < thr  # (B, N, T)


def _per_sample(correct: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
    """(B, N, T) correct, (B, N) visible → (B, T) per-sample PCK, 0 for a sample with none visible."""
    vis = visible.bool()[..., None]  # (B, N, 1)
    hits = (correct & vis).sum(1).double()  # (B, T)
    count = vis.sum(1).double()  # (B, 1)
    return torch.where(count > 0, hits / count.clamp(min=1), torch.zeros_like(hits))


def pck_per_sample(pred: torch.Tensor, target: torch.Tensor, visible: torch.Tensor, norm: torch.Tensor,
                   thresholds: Sequence[float] = THRESHOLDS) -> torch.Tensor:
    """pred, target (B, N, 2) pixels; visible (B, N) bool; norm (B,) → (B, T) per-sample PCK."""
    return _per_sample(_correct(pred, target, norm, thresholds), visible)


def polysemy_groups(categories: Iterable) -> dict[int, torch.Tensor] | None:
    """Category id → (K,) bool mask of its polysemous keypoints (``Category.polysemous``), what
    :class:`PCKAccumulator` takes as ``groups``; ``None`` when no category lists one, so that an evaluation
    of MP-100 reports exactly the standard keys."""
    masks = {}
    for cat in categories:
        mask = torch.zeros(cat.num_keypoints, dtype=torch.bool)
        mask[list(cat.polysemous)] = True
        masks[cat.id] = mask
    return masks if any(bool(m.any()) for m in masks.values()) else None


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
    ``{"pck_0.05": ..., ..., "pck_mean": ..., "count": n}``, the mean being over the thresholds.

    ``groups`` (category id → (K,) bool mask of its polysemous keypoints, :func:`polysemy_groups`) adds the
    keypoint-level PCK of the ``polysemous`` and ``unambiguous`` keypoints (module docstring); :meth:`update`
    then needs the batch's category ids. A category the map lacks has no polysemous keypoint. Every sum sits
    in one tensor, so one all-reduce sums them all.
    """

    def __init__(self, thresholds: Sequence[float] = THRESHOLDS, groups: dict[int, torch.Tensor] | None = None):
        self.thresholds = tuple(thresholds)
        self.groups = groups
        self._padded: dict[tuple[int, int], torch.Tensor] = {}  # (category id, slots) → (N,) mask
        blocks = 1 + (len(GROUPS) if groups is not None else 0)
        # per block: a sum per threshold, then a count (samples, then each group's keypoints)
        self.sums = torch.zeros(blocks * (len(self.thresholds) + 1), dtype=torch.float64)

    def update(self, pred: torch.Tensor, target: torch.Tensor, visible: torch.Tensor, norm: torch.Tensor,
               category_id: torch.Tensor | None = None) -> torch.Tensor:
        """Add a batch (``category_id`` (B,) is needed with ``groups``); returns its (B, T) per-sample PCK."""
        t = len(self.thresholds)
        correct = _correct(pred, target, norm, self.thresholds)  # (B, N, T)
        per_sample = _per_sample(correct, visible)  # (B, T)
        self.sums[:t] += per_sample.sum(0).cpu()
        self.sums[t] += len(pred)
        if self.groups is not None:
            if category_id is None:
                raise ValueError("PCKAccumulator(groups=...) needs the batch's category_id in update()")
            vis = visible.bool()
            poly = self._polysemous(category_id, vis.shape[1]).to(vis.device)  # (B, N)
            for g, members in enumerate((poly, ~poly), start=1):
                scored = vis & members  # (B, N)
                base = g * (t + 1)
                self.sums[base: base + t] += (correct & scored[..., None]).sum((0, 1)).double().cpu()
                self.sums[base + t] += float(scored.sum())
        return per_sample

    def _polysemous(self, category_id: torch.Tensor, slots: int) -> torch.Tensor:
        """(B,) category ids → (B, N) bool: the slots of each sample's polysemous keypoints."""
        rows = []
        for cid in category_id.tolist():
            key = (int(cid), slots)
            if key not in self._padded:
                mask = self.groups.get(int(cid), torch.zeros(0, dtype=torch.bool))[:slots]
                self._padded[key] = torch.cat([mask, torch.zeros(slots - len(mask), dtype=torch.bool)])
            rows.append(self._padded[key])
        return torch.stack(rows)

    def all_reduce(self, device: torch.device) -> None:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            sums = self.sums.to(device)
            dist.all_reduce(sums)
            self.sums = sums.cpu()

    def result(self) -> dict[str, float]:
        t = len(self.thresholds)
        out = self._block(0, "")
        out["count"] = float(self.sums[t])
        if self.groups is not None:
            for g, name in enumerate(GROUPS, start=1):
                out.update(self._block(g, f"{name}/"))
                out[f"{name}/{KEYPOINTS}"] = float(self.sums[g * (t + 1) + t])
        return out

    def _block(self, g: int, prefix: str) -> dict[str, float]:
        """PCK per threshold and their mean of sum block ``g`` (its sums over its count, at least 1)."""
        t = len(self.thresholds)
        base = g * (t + 1)
        count = max(float(self.sums[base + t]), 1.0)
        out = {f"{prefix}{pck_key(x)}": float(self.sums[base + i]) / count for i, x in enumerate(self.thresholds)}
        out[f"{prefix}{MEAN}"] = sum(out.values()) / t
        return out
