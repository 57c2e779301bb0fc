"""CapeNext training loss (paper Sec. 3.6, Eq. 9-11), as the reference computes it.

    L = lambda_heatmap * L_heatmap + L_offset                                              (Eq. 11)

Per sample, with the mask m_i = query target weight x support target weight and n = sum_i m_i
(n = 1 when 0):
- heatmap (Eq. 9): MSE between sigmoid(similarity map) and the ground-truth heatmap, which is resized
  bilinearly to the map size (e.g. 64x64 → 16x16) and renormalised to peak 1; mean over pixels, times
  m_i, summed over keypoints, divided by n; averaged over the batch; weight lambda = 2.
- proposal and offset_layer{l} (Eq. 10): L1 in [0, 1] crop coordinates (summed over x, y), times m_i,
  summed over keypoints, divided by n; summed over the batch and divided by B.

Where the paper and the reference differ (we follow the reference):
- Eq. 9 reads like an L1 norm (||.||); the reference uses the squared error (MSE).
- Eq. 10 averages the decoder layers (1/L) and has no proposal term; the reference *sums* one L1 term
  per decoder layer and adds an L1 term on the proposal generator's soft-argmax.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["CapeNextLoss"]


class CapeNextLoss(nn.Module):
    """``loss_fn(out, target_heatmap, target_points, query_weight, support_weight) -> dict``.

    Args:
        out: the model's output dict (``sim`` (B, K, h, w), ``proposal`` (B, K, 2), ``points`` (L, B, K, 2)).
        target_heatmap: (B, K, Hh, Wh) Gaussian targets, peak 1.
        target_points: (B, K, 2) ground truth (x, y) in [0, 1] crop coordinates.
        query_weight, support_weight: (B, K) target weights (0 for padded/invisible/outside).
    Returns:
        {"heatmap", "proposal", "offset_layer0", ..., "loss"}: each term unweighted (scalar tensors)
        and ``loss`` = sum of ``self.weights[name] * term`` (``heatmap`` weighted by ``heatmap_weight``).
    """

    def __init__(self, heatmap_weight: float = 2.0):
        super().__init__()
        self.heatmap_weight = heatmap_weight
        self.weights: dict[str, float] = {}

    @staticmethod
    def heatmap_loss(sim: torch.Tensor, target: torch.Tensor, weight: torch.Tensor,
                     normalizer: torch.Tensor) -> torch.Tensor:
        """sim (B, K, h, w) logits, target (B, K, Hh, Wh), weight (B, K), normalizer (B,) → scalar."""
        h, w = sim.shape[-2:]
        target = F.interpolate(target.float(), size=(h, w), mode="bilinear", align_corners=False)  # (B, K, h, w)
        target = target / (target.amax(dim=(-2, -1), keepdim=True) + 1e-10)  # peak 1
        mse = F.mse_loss(sim.float().sigmoid(), target, reduction="none")  # (B, K, h, w)
        per_kp = mse.flatten(2).mean(-1) * weight  # (B, K)
        return (per_kp.sum(-1) / normalizer).mean()

    @staticmethod
    def l1_loss(points: torch.Tensor, target: torch.Tensor, weight: torch.Tensor,
                normalizer: torch.Tensor) -> torch.Tensor:
        """points, target (B, K, 2), weight (B, K), normalizer (B,) → scalar."""
        l1 = (points.float() - target).abs().sum(-1) * weight  # (B, K)
        return (l1.sum(-1) / normalizer).sum() / points.shape[0]

    def forward(self, out: dict[str, torch.Tensor], target_heatmap: torch.Tensor, target_points: torch.Tensor,
                query_weight: torch.Tensor, support_weight: torch.Tensor) -> dict[str, torch.Tensor]:
        weight = query_weight.float() * support_weight.float()  # (B, K)
        normalizer = weight.sum(-1)
        normalizer = torch.where(normalizer == 0, torch.ones_like(normalizer), normalizer)  # (B,)
        target_points = target_points.float()
        terms = {
            "heatmap": self.heatmap_loss(out["sim"], target_heatmap, weight, normalizer),
            "proposal": self.l1_loss(out["proposal"], target_points, weight, normalizer),
        }
        for i, layer_points in enumerate(out["points"]):
            terms[f"offset_layer{i}"] = self.l1_loss(layer_points, target_points, weight, normalizer)
        self.weights = {name: (self.heatmap_weight if name == "heatmap" else 1.0) for name in terms}
        terms["loss"] = sum(self.weights[name] * value for name, value in terms.items())
        return terms
