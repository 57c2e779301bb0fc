"""Training and evaluation steps, shared by local runs, Ray Train workers, evaluation and benchmarks.

Plain functions in the DETR manner (``engine.py``): :func:`train_one_epoch` and :func:`evaluate` take a
model, a criterion and an iterable of batches (dicts from :func:`capenext.data.make_item`, collated),
and know nothing of Ray or MLflow. Frozen CLIP text embeddings come from an :class:`EmbeddingBank`
(precomputed by ``pipelines.embed``, or encoded once in-process), so a batch carries category ids, not
strings.
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch
import torch.distributed as dist
from torch import nn

from capenext.config import THRESHOLDS
from capenext.metrics import pck_per_sample


@dataclass
class EmbeddingBank:
    """Frozen CLIP embeddings looked up by id: keypoint texts and class prompt by category, images by
    annotation id. Every vector is L2-normalised; ``keypoints[c]`` is (K_c, C)."""

    keypoints: dict[int, torch.Tensor]
    classes: dict[int, torch.Tensor] = field(default_factory=dict)
    images: dict[int, torch.Tensor] = field(default_factory=dict)

    def fill(self, batch: dict[str, torch.Tensor], slots: int, image_embedding: bool, class_embedding: bool,
             ) -> dict[str, torch.Tensor]:
        """Add ``kp_emb`` (B, slots, C), zero where the support keypoint is invisible or padded, and,
        when asked, ``cls_emb`` / ``img_emb`` (B, C)."""
        cats = batch["category_id"].tolist()
        first = self.keypoints[cats[0]]
        kp = torch.zeros(len(cats), slots, first.shape[-1], dtype=first.dtype)
        for i, c in enumerate(cats):
            table = self.keypoints[c]
            kp[i, : len(table)] = table
        batch["kp_emb"] = kp * batch["kp_mask"].unsqueeze(-1).to(kp.dtype)  # (B, slots, C)
        if class_embedding:
            batch["cls_emb"] = torch.stack([self.classes[c] for c in cats])  # (B, C)
        if image_embedding:
            try:
                batch["img_emb"] = torch.stack([self.images[a] for a in batch["ann_id"].tolist()])
            except KeyError as err:
                raise KeyError(f"no precomputed image embedding for annotation {err.args[0]}") from None
        return batch


def pck_key(thr: float) -> str:
    """Metric name of PCK at ``thr``: ``pck_0.2`` (DESIGN.md writes ``pck@0.2``; MLflow forbids ``@``)."""
    return f"pck_{thr:g}"


def to_image_pixels(points: torch.Tensor, inverse: torch.Tensor, image_size: int) -> torch.Tensor:
    """(B, K, 2) points in [0, 1] crop coordinates → image pixels through each (B, 2, 3) inverse crop."""
    xy = points * image_size  # (B, K, 2) crop pixels
    return xy @ inverse[:, :, :2].transpose(1, 2) + inverse[:, :, 2].unsqueeze(1)


def _to(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def autocast(device: torch.device):
    """bf16 autocast on GPU (as the training issue asks); full precision on CPU for determinism."""
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()


def train_one_epoch(
    model: nn.Module,
    criterion: nn.Module,
    batches: Iterable[dict[str, torch.Tensor]],
    optimizer: torch.optim.Optimizer,
    device: torch.device,
    prepare: Callable[[dict], dict],
    lr_at_step: Callable[[int], float] | None = None,
    start_step: int = 0,
    max_steps: int | None = None,
    on_step: Callable[[int, dict[str, float]], None] | None = None,
) -> tuple[dict[str, float], int]:
    """One pass; returns (mean of each loss term, the global step after it).

    ``prepare`` adds the embeddings to a CPU batch; ``lr_at_step(step)`` sets the learning rate before
    each step. A non-finite loss stops training with a clear error (DETR does the same).
    """
    model.train()
    sums: dict[str, float] = {}
    n = 0
    step = start_step
    for batch in batches:
        if max_steps is not None and n >= max_steps:
            break
        if lr_at_step is not None:
            for group in optimizer.param_groups:
                group["lr"] = lr_at_step(step)
        batch = _to(prepare(batch), device)
        with autocast(device):
            out = model(batch)
        losses = criterion(
            {k: v.float() if torch.is_tensor(v) else v for k, v in out.items()},
            batch["heatmap"], batch["points"], batch["query_weight"], batch["support_weight"],
        )
        loss = losses["loss"]
        if not math.isfinite(loss.item()):
            raise FloatingPointError(f"loss is {loss.item()} at step {step}; stopping (terms: "
                                     f"{ {k: round(float(v), 4) for k, v in losses.items()} })")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        step += 1
        n += 1
        values = {k: float(v.detach()) for k, v in losses.items() if torch.is_tensor(v) and v.dim() == 0}
        for k, v in values.items():
            sums[k] = sums.get(k, 0.0) + v
        if on_step is not None:
            on_step(step, values)
    return {k: v / max(n, 1) for k, v in sums.items()}, step


@torch.no_grad()
def evaluate(
    model: nn.Module,
    batches: Iterable[dict[str, torch.Tensor]],
    device: torch.device,
    prepare: Callable[[dict], dict],
    image_size: int,
    thresholds: tuple[float, ...] = THRESHOLDS,
    keep: list | None = None,
) -> dict[str, float]:
    """PCK over every query of the episodes, all-reduced across ranks when distributed.

    Predictions are the last decoder layer's points mapped back to image pixels; ``norm`` is the cleaned
    query bbox's max side; a keypoint counts where query and support are both visible. Returns
    ``{"pck_0.05": ..., ..., "pck_mean": ..., "count": n}`` (MLflow allows no ``@`` in names). ``keep``, when given, receives one record
    per query (ids, predictions, per-sample PCK per threshold) for pictures of the best and worst samples.
    """
    model.eval()
    sums = torch.zeros(len(thresholds) + 1, dtype=torch.float64)
    for batch in batches:
        batch = _to(prepare(batch), device)
        with autocast(device):
            out = model(batch)
        pred = to_image_pixels(out["points"][-1].float(), batch["inverse"], image_size)
        per_sample = pck_per_sample(pred, batch["gt_xy"], batch["visible"], batch["norm"], thresholds)  # (B, T)
        sums[:-1] += per_sample.sum(0).cpu()
        sums[-1] += len(pred)
        if keep is not None:
            for b in range(len(pred)):
                keep.append({
                    "ann_id": int(batch["ann_id"][b]), "category_id": int(batch["category_id"][b]),
                    "pred": pred[b].cpu(), "pck": per_sample[b].tolist(),
                })
    if dist.is_available() and dist.is_initialized():
        sums = sums.to(device)
        dist.all_reduce(sums)
        sums = sums.cpu()
    count = max(float(sums[-1]), 1.0)
    result = {pck_key(thr): float(sums[i]) / count for i, thr in enumerate(thresholds)}
    result["pck_mean"] = sum(result.values()) / len(thresholds)
    result["count"] = float(sums[-1])
    return result
