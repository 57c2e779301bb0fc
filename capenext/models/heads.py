"""Keypoint heads (paper Sec. 3.3 "keypoint prediction"; the reference's ``PoseHead``).

- :class:`JointProjection`: e'_joint (C, CLIP space) → keypoint tokens (d), applied to
  ``e'_joint ⊙ support mask`` so padded slots become the bias alone (reference ``text_proj``).
- :class:`OffsetHead`: one per decoder layer, 3 x [Linear d→d + GELU] then Linear d→2 (zero-initialised),
  predicting an offset in inverse-sigmoid space (the reference's ``TokenDecodeMLP``/``kpt_branch``).
- :func:`refine`: ``sigmoid(inverse_sigmoid(points) + delta)``, eps 1e-3 as the reference.

Where the paper and the reference differ: the paper says the graph node features are "decoded into
similarity heatmaps and offset maps through parallel CNN heads" and that peaks are refined by offsets;
the reference (and this code) regresses coordinates with MLP offset heads, no CNN heads.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["JointProjection", "OffsetHead", "inverse_sigmoid", "refine"]


def inverse_sigmoid(x: torch.Tensor, eps: float = 1e-3) -> torch.Tensor:
    """log(x / (1 - x)) with x clamped to [0, 1] and both terms to at least ``eps`` (reference)."""
    x = x.clamp(0, 1)
    return torch.log(x.clamp(min=eps) / (1 - x).clamp(min=eps))


def refine(points: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """points (B, K, 2) in [0, 1], delta (B, K, 2) unsigmoided offsets → (B, K, 2) in [0, 1]."""
    return (inverse_sigmoid(points) + delta).sigmoid()


class JointProjection(nn.Linear):
    """Linear C → d on ``e_joint * mask`` (B, K, C) → (B, K, d); xavier-uniform weight, zero bias."""

    def forward(self, e_joint: torch.Tensor, kp_mask: torch.Tensor) -> torch.Tensor:
        return super().forward(e_joint * kp_mask.unsqueeze(-1).to(e_joint.dtype))


class OffsetHead(nn.Module):
    """3 x [Linear + GELU] then Linear → 2; forward (B, K, d) → (B, K, 2). Last layer starts at zero."""

    def __init__(self, dim: int, layers: int = 3):
        super().__init__()
        self.hidden = nn.ModuleList(nn.Linear(dim, dim) for _ in range(layers))
        self.out = nn.Linear(dim, 2)

    def reset_last(self) -> None:
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.hidden:
            x = F.gelu(layer(x))
        return self.out(x)
