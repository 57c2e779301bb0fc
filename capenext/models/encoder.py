"""Transformer encoder over image and keypoint tokens (paper Sec. 3.3; GraphCape/CapeX encoder).

Image tokens (h*w of them) and keypoint tokens (K = 100) are concatenated and pass through post-norm
layers (d = 256, 8 heads, FFN 768, ReLU, dropout 0.1); invalid keypoint slots are key-padded. Image
tokens carry a sine position (:class:`SinePositionalEncoding`, DETR style: 128 features per axis,
normalised cumulative (1..h)/h, scale 2*pi, channels ordered [y, x]); keypoint tokens get position 0.

Reference quirk (kept): each layer first sets ``src = src + pos`` and uses that sum for q, k, v *and*
the residual, so the position is re-added at every layer (DETR adds it to q and k only, once per
layer, without carrying it into the residual stream).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["SinePositionalEncoding", "TransformerEncoder", "TransformerEncoderLayer"]


class SinePositionalEncoding(nn.Module):
    """DETR sine encoding: ``forward(h, w)`` for a map, ``coordinates(points)`` for [0,1] points.

    Output channels: 2 * num_feats, ordered [y features, x features]; within each axis the pairs are
    (sin(p / t_j), cos(p / t_j)) with t_j = temperature ** (2 * (j // 2) / num_feats).
    """

    def __init__(self, num_feats: int, temperature: float = 10000.0, scale: float = 2 * math.pi,
                 eps: float = 1e-6):
        super().__init__()
        self.num_feats, self.temperature, self.scale, self.eps = num_feats, temperature, scale, eps

    def _dim_t(self, device) -> torch.Tensor:
        dim_t = torch.arange(self.num_feats, dtype=torch.float32, device=device)
        return self.temperature ** (2 * torch.div(dim_t, 2, rounding_mode="floor") / self.num_feats)

    @staticmethod
    def _interleave(p: torch.Tensor) -> torch.Tensor:
        # (..., F) → (..., F): [sin(p0), cos(p1), sin(p2), cos(p3), ...] (p_{2j} == p_{2j+1})
        return torch.stack((p[..., 0::2].sin(), p[..., 1::2].cos()), dim=-1).flatten(-2)

    def forward(self, h: int, w: int, device=None) -> torch.Tensor:
        """Map encoding (1, 2F, h, w) with y = (1..h)/h * scale and x = (1..w)/w * scale."""
        y = torch.arange(1, h + 1, dtype=torch.float32, device=device) / (h + self.eps) * self.scale  # (h,)
        x = torch.arange(1, w + 1, dtype=torch.float32, device=device) / (w + self.eps) * self.scale  # (w,)
        dim_t = self._dim_t(device)
        pos_y = self._interleave(y[:, None] / dim_t)[:, None, :].expand(h, w, -1)  # (h, w, F)
        pos_x = self._interleave(x[:, None] / dim_t)[None, :, :].expand(h, w, -1)  # (h, w, F)
        return torch.cat((pos_y, pos_x), dim=-1).permute(2, 0, 1).unsqueeze(0)  # (1, 2F, h, w)

    def coordinates(self, points: torch.Tensor) -> torch.Tensor:
        """Points (B, K, 2) as (x, y) in [0, 1] → (B, K, 2F) with xy * scale (no normalisation)."""
        dim_t = self._dim_t(points.device)
        pos_x = self._interleave(points[..., 0:1] * self.scale / dim_t)  # (B, K, F)
        pos_y = self._interleave(points[..., 1:2] * self.scale / dim_t)  # (B, K, F)
        return torch.cat((pos_y, pos_x), dim=-1)  # (B, K, 2F)


class TransformerEncoderLayer(nn.Module):
    """Post-norm layer; input ``src + pos`` is q, k, v and the residual (reference quirk)."""

    def __init__(self, dim: int, heads: int, ffn_dim: int, dropout: float):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.linear1 = nn.Linear(dim, ffn_dim)
        self.linear2 = nn.Linear(ffn_dim, dim)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.dropout = nn.Dropout(dropout)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)

    def forward(self, src: torch.Tensor, pos: torch.Tensor, key_padding_mask: torch.Tensor) -> torch.Tensor:
        """src, pos (B, N, d); key_padding_mask (B, N) True = ignore → (B, N, d)."""
        src = src + pos  # (B, N, d) the position enters the residual stream
        attn = self.self_attn(src, src, src, key_padding_mask=key_padding_mask, need_weights=False)[0]
        src = self.norm1(src + self.dropout1(attn))
        ffn = self.linear2(self.dropout(F.relu(self.linear1(src))))
        return self.norm2(src + self.dropout2(ffn))  # (B, N, d)


class TransformerEncoder(nn.Module):
    """Joint encoder of image tokens and keypoint tokens.

    forward(feat (B, d, h, w), kp (B, K, d), pos (1, d, h, w), kp_mask (B, K) True = valid)
        → memory (B, h*w, d) refined image tokens, kp (B, K, d) refined keypoint tokens.
    """

    def __init__(self, dim: int, heads: int, ffn_dim: int, dropout: float, layers: int):
        super().__init__()
        self.layers = nn.ModuleList(TransformerEncoderLayer(dim, heads, ffn_dim, dropout) for _ in range(layers))

    def forward(self, feat: torch.Tensor, kp: torch.Tensor, pos: torch.Tensor, kp_mask: torch.Tensor):
        b, d, h, w = feat.shape
        img = feat.flatten(2).transpose(1, 2)  # (B, hw, d)
        pos_img = pos.flatten(2).transpose(1, 2).expand(b, -1, -1)  # (B, hw, d)
        x = torch.cat((img, kp), dim=1)  # (B, hw + K, d)
        pos_all = torch.cat((pos_img, torch.zeros_like(kp)), dim=1)  # (B, hw + K, d) keypoints at 0
        padding = torch.cat((kp_mask.new_zeros(b, h * w), ~kp_mask), dim=1)  # (B, hw + K) True = ignore
        for layer in self.layers:
            x = layer(x, pos_all, padding)
        return x[:, : h * w], x[:, h * w:]  # (B, hw, d), (B, K, d)
