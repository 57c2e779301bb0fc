"""Training and evaluation steps, shared by local runs, Ray Train workers, evaluation and benchmarks.

Plain functions in the DETR manner (``engine.py``): :func:`train_one_epoch` and :func:`evaluate` take a
model, a criterion and an iterable of batches (dicts from :func:`capenext.data.make_item`, collated),
and know nothing of Ray or MLflow. Frozen CLIP text embeddings come from an :class:`~capenext.data.embeddings.EmbeddingBank`
(precomputed by ``pipelines.embed``, or encoded once in-process), so a batch carries category ids, not
strings.
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from typing import Callable, Iterable

import torch
from torch import nn

from capenext.config import THRESHOLDS, OptimCfg
from capenext.metrics import PCKAccumulator


def lr_factor(step: int, epoch: int, optim: OptimCfg) -> float:
    """The reference's schedule as a factor of ``optim.lr``: linear warm-up from ``warmup_ratio`` over
    ``warmup_iters`` steps, then ÷10 at each ``lr_steps`` fraction of the epochs."""
    warm = 1.0
    if step < optim.warmup_iters:
        warm = optim.warmup_ratio + (1 - optim.warmup_ratio) * step / optim.warmup_iters
    decay = 0.1 ** sum(epoch >= int(round(f * optim.epochs)) for f in optim.lr_steps)
    return warm * decay


def make_optimizer(params: Iterable[nn.Parameter], optim: OptimCfg) -> torch.optim.Adam:
    """The reference's Adam (lr, weight decay); ``optim.fused_adam`` runs it as one fused kernel."""
    return torch.optim.Adam(params, lr=optim.lr, weight_decay=optim.weight_decay, fused=optim.fused_adam)


def to_image_pixels(points: torch.Tensor, inverse: torch.Tensor, image_size: int) -> torch.Tensor:
    """(B, K, 2) points in [0, 1] crop coordinates → image pixels through each (B, 2, 3) inverse crop."""
    xy = points * image_size  # (B, K, 2) crop pixels
    return xy @ inverse[:, :, :2].transpose(1, 2) + inverse[:, :, 2].unsqueeze(1)


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """Every tensor of ``batch`` on ``device`` (non-blocking); other values as they are."""
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def precision_of(model: nn.Module) -> str:
    """The model's precision setting (``model.precision`` of its config: ``fp32`` or ``bf16``); a model
    without one (the mean-position floor) runs in fp32."""
    return getattr(getattr(model, "module", model), "precision", "fp32")


def autocast(device: torch.device, precision: str = "fp32"):
    """bf16 autocast on CUDA when the model's precision is ``bf16`` (an opt-in for speed); full precision
    otherwise, as the reference runs the pose model (and always on CPU, for determinism)."""
    if precision == "bf16" and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


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
        batch = to_device(prepare(batch), device)
        with autocast(device, precision_of(model)):
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
    groups: dict[int, torch.Tensor] | None = None,
) -> dict[str, float]:
    """PCK over every query of the episodes, all-reduced across ranks when distributed.

    Predictions are the last decoder layer's points mapped back to image pixels; ``norm`` is the cleaned
    query bbox's max side; a keypoint counts where query and support are both visible. Returns
    ``{"pck_0.05": ..., ..., "pck_mean": ..., "count": n}`` (MLflow allows no ``@`` in names). ``keep``, when given, receives one record
    per query (ids, predictions, per-sample PCK per threshold) for pictures of the best and worst samples.
    ``groups`` (category id → polysemous keypoint mask, :func:`capenext.metrics.polysemy_groups`) adds the
    ``polysemous/`` and ``unambiguous/`` keypoint-level PCK.
    """
    model.eval()
    acc = PCKAccumulator(thresholds, groups)
    for batch in batches:
        batch = to_device(prepare(batch), device)
        with autocast(device, precision_of(model)):
            out = model(batch)
        pred = to_image_pixels(out["points"][-1].float(), batch["inverse"], image_size)
        score(acc, pred, batch, keep)
    acc.all_reduce(device)
    return acc.result()


def score(acc: PCKAccumulator, pred: torch.Tensor, batch: dict[str, torch.Tensor], keep: list | None = None
          ) -> torch.Tensor:
    """Add a batch of pairs to ``acc``: ``pred`` (B, K, 2) image pixels against ``batch``'s ``gt_xy``
    (B, K, 2), ``visible`` (B, K) and ``norm`` (B,); one record per pair into ``keep`` when given (ids,
    ``pred`` (K, 2) on the CPU, ``pck`` per threshold). Returns the (B, T) per-pair PCK. One scoring for
    the per-pair loop (:func:`evaluate`) and the deduplicated protocol (:mod:`capenext.protocol`)."""
    per_sample = acc.update(pred, batch["gt_xy"], batch["visible"], batch["norm"], batch.get("category_id"))  # (B, T)
    if keep is not None:
        for b in range(len(pred)):
            keep.append({
                "ann_id": int(batch["ann_id"][b]), "category_id": int(batch["category_id"][b]),
                "pred": pred[b].cpu(), "pck": per_sample[b].tolist(),
            })
    return per_sample
