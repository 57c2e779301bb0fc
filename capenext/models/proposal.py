"""Proposal generator (paper Sec. 3.3 and Sec. 3.6 "similarity maps"; CapeFormer's two-stage design).

From the encoded keypoint tokens and image tokens:
    fs  = (1 + tanh(MLP_d→d/2→d(Ls(kp)))) ⊙ Ls(kp)          dynamic keypoint feature   (B, K, d)
    fq  = Lq(memory)                                                                   (B, hw, d)
    sim = fq · fsᵀ, no temperature → one h x w map per keypoint (the H_i of Eq. 9)     (B, K, h, w)
Two read-outs, on cell centres ((i + 0.5) / h, (j + 0.5) / w):
- ``proposal``: soft-argmax over the whole map (supervised by the proposal term of the offset loss);
- ``proposal_local``: the softmax masked to the 3x3 window around the argmax, renormalised, then the
  expectation; the decoder starts from it (``GraphDecoder`` detaches it).
The reference reshapes the one-hot peak as (w, h) before the 3x3 max-pool; that equals our (h, w)
for the square maps every backbone gives.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["ProposalGenerator", "cell_centres"]


def cell_centres(h: int, w: int, device=None) -> torch.Tensor:
    """(h*w, 2) (x, y) centres of the cells of an h x w map, in [0, 1], row-major."""
    ys = (torch.arange(h, dtype=torch.float32, device=device) + 0.5) / h
    xs = (torch.arange(w, dtype=torch.float32, device=device) + 0.5) / w
    gy, gx = torch.meshgrid(ys, xs, indexing="ij")  # (h, w)
    return torch.stack((gx, gy), dim=-1).reshape(h * w, 2)


class ProposalGenerator(nn.Module):
    """forward(memory (B, hw, d), kp (B, K, d), (h, w)) → sim (B, K, h, w), proposal, proposal_local (B, K, 2)."""

    def __init__(self, dim: int, proj_dim: int | None = None, dynamic_dim: int | None = None):
        super().__init__()
        proj_dim = proj_dim or dim
        dynamic_dim = dynamic_dim or dim // 2
        self.support_proj = nn.Linear(dim, proj_dim)  # Ls
        self.query_proj = nn.Linear(dim, proj_dim)  # Lq
        self.dynamic_proj = nn.Sequential(nn.Linear(proj_dim, dynamic_dim), nn.ReLU(), nn.Linear(dynamic_dim, proj_dim))

    def forward(self, memory: torch.Tensor, kp: torch.Tensor, size: tuple[int, int]):
        h, w = size
        b, k, _ = kp.shape
        fs = self.support_proj(kp)  # (B, K, p)
        fs = (torch.tanh(self.dynamic_proj(fs)) + 1) * fs  # (B, K, p)
        fq = self.query_proj(memory)  # (B, hw, p)
        sim = torch.bmm(fs, fq.transpose(1, 2))  # (B, K, hw)
        grid = cell_centres(h, w, sim.device)  # (hw, 2)
        prob = sim.softmax(dim=-1)  # (B, K, hw)
        proposal = prob @ grid  # (B, K, 2) soft-argmax over the whole map
        peak = F.one_hot(sim.argmax(dim=-1), h * w).to(sim.dtype).view(b * k, 1, h, w)  # (BK, 1, h, w)
        window = F.max_pool2d(peak, kernel_size=3, stride=1, padding=1).view(b, k, h * w)  # (B, K, hw) 3x3
        local = prob * window
        local = local / (local.sum(dim=-1, keepdim=True) + 1e-10)  # (B, K, hw) renormalised
        proposal_local = local @ grid  # (B, K, 2)
        return sim.view(b, k, h, w), proposal, proposal_local
