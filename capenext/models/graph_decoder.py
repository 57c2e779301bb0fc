"""Graph transformer decoder (paper Sec. 3.3; GraphCape, Hirschorn and Avidan 2024; CapeX).

Keypoint queries, starting from the proposal generator's points, are refined layer by layer.
Per layer (post-norm; d = 256, 8 heads, GCN hidden 768, dropout 0.1):
    qpos = MLP_GELU(sine(points))                       shared 2-layer MLP, xy * 2*pi
    x = LN1(x + Drop(SelfAttn(q = k = x + qpos, v = x)))        padded keypoints key-masked
    x = LN2(x + Drop(Linear_2d→d(MHA_2d(q = [x; qpos], k = [memory; pos], v = memory))))
    x = LN3(x + Drop(Linear_768→d(Drop(ReLU(GCN_d→768(x, A))))))
    points ← sigmoid(inverse_sigmoid(points) + OffsetHead_l(x))  then detached for the next layer
The cross-attention concatenates content and position instead of adding them (MHA width 2d, value
width d). The GCN (:class:`GCNLayer`) sums a self term on valid nodes and a neighbour term through
:func:`normalized_adjacency`.

Reference details kept (each a quirk):
- If every keypoint of a sample is masked, slot 0 is unmasked (self-attention and adjacency) to avoid NaN.
- The GCN aggregates ``out[w] = sum_v Â[v, w] x[v]`` with Â *row*-normalised, i.e. it uses Âᵀ.
- The GCN has its own ReLU and the layer applies another one (a no-op, kept for fidelity).
- Layer 0's query position is computed from the proposal generator's local points *without* detaching
  them, so the heatmap branch receives gradient through it; later layers use detached points (the
  reference detaches only the points, not this input).
- The per-layer output points returned by :meth:`GraphDecoder.forward` are the *input* points of each
  layer; the model's final points are ``refine(input_points_l, OffsetHead_l(LN(x_l)))`` (normed
  features), while the update inside the loop uses the un-normed features. Points after layer 0 are
  not detached in that output, so layer l's loss reaches layer l-1's head.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from capenext.models.encoder import SinePositionalEncoding
from capenext.models.heads import OffsetHead, refine

__all__ = ["GCNLayer", "GraphDecoder", "GraphDecoderLayer", "fix_all_masked", "normalized_adjacency"]


def fix_all_masked(kp_mask: torch.Tensor) -> torch.Tensor:
    """kp_mask (B, K) True = valid; samples with no valid slot get slot 0 valid (reference, avoids NaN)."""
    empty = ~kp_mask.any(dim=1)  # (B,)
    if not bool(empty.any()):
        return kp_mask
    fixed = kp_mask.clone()
    fixed[empty, 0] = True
    return fixed


def normalized_adjacency(adj: torch.Tensor, kp_mask: torch.Tensor) -> torch.Tensor:
    """The GCN's two kernels from a 0/1 skeleton adjacency.

    adj (B, K, K) 0/1, kp_mask (B, K) True = valid → (B, 2, K, K):
      [:, 0] = diag(valid) (self term);
      [:, 1] = Â: A = max(A, Aᵀ), rows and columns of invalid slots zeroed, each row divided by its sum
               (rows without a neighbour stay 0).
    """
    a = torch.maximum(adj, adj.transpose(1, 2)).to(torch.float32)  # (B, K, K) symmetric
    valid = kp_mask.to(torch.float32)  # (B, K)
    a = a * valid[:, :, None] * valid[:, None, :]  # masked
    a = torch.nan_to_num(a / a.sum(dim=-1, keepdim=True))  # row-normalised
    return torch.stack((torch.diag_embed(valid), a), dim=1)  # (B, 2, K, K)


class GCNLayer(nn.Module):
    """Two-kernel graph conv: Linear in → 2*out, then ``out[w] = sum_k sum_v x_k[v] adj[k, v, w]``; ReLU.

    The reference uses ``Conv1d(in, 2 * out, 1)``; a Linear is the same map (weight squeezed).
    forward(x (B, K, in), adj (B, 2, K, K)) → (B, K, out).
    """

    def __init__(self, in_dim: int, out_dim: int, kernels: int = 2):
        super().__init__()
        self.kernels, self.out_dim = kernels, out_dim
        self.linear = nn.Linear(in_dim, out_dim * kernels)

    def forward(self, x: torch.Tensor, adj: torch.Tensor) -> torch.Tensor:
        b, k, _ = x.shape
        x = self.linear(x).view(b, k, self.kernels, self.out_dim)  # (B, K, kernels, out)
        x = torch.einsum("bvkc,bkvw->bwc", x, adj.to(x.dtype))  # (B, K, out)
        return F.relu(x)


class GraphDecoderLayer(nn.Module):
    """One decoder layer; forward(x, memory, pos, qpos, padding, adj) → (B, K, d)."""

    def __init__(self, dim: int, heads: int, ffn_dim: int, dropout: float):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.cross_attn = nn.MultiheadAttention(2 * dim, heads, dropout=dropout, vdim=dim, batch_first=True)
        self.choker = nn.Linear(2 * dim, dim)
        self.gcn = GCNLayer(dim, ffn_dim)
        self.linear2 = nn.Linear(ffn_dim, dim)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)
        self.dropout = nn.Dropout(dropout)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)
        self.dropout3 = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, memory: torch.Tensor, pos: torch.Tensor, qpos: torch.Tensor,
                padding: torch.Tensor, adj: torch.Tensor) -> torch.Tensor:
        """x, qpos (B, K, d); memory, pos (B, hw, d); padding (B, K) True = ignore; adj (B, 2, K, K)."""
        q = x + qpos  # (B, K, d)
        x = self.norm1(x + self.dropout1(
            self.self_attn(q, q, x, key_padding_mask=padding, need_weights=False)[0]))
        cq = torch.cat((x, qpos), dim=-1)  # (B, K, 2d) concatenated, not added
        ck = torch.cat((memory, pos), dim=-1)  # (B, hw, 2d)
        attn = self.cross_attn(cq, ck, memory, need_weights=False)[0]  # (B, K, 2d)
        x = self.norm2(x + self.dropout2(self.choker(attn)))  # (B, K, d)
        ffn = self.linear2(self.dropout(F.relu(self.gcn(x, adj))))  # (B, K, d)
        return self.norm3(x + self.dropout3(ffn))


class GraphDecoder(nn.Module):
    """Stack of :class:`GraphDecoderLayer` with a shared query-position MLP and a final LayerNorm.

    forward(kp (B, K, d), memory (B, hw, d), pos (B, hw, d), proposal_local (B, K, 2), kp_mask (B, K),
            adj (B, K, K), offset_heads: L x OffsetHead)
        → feats (L, B, K, d) normed features per layer, points_in list of L (B, K, 2) input points.
    """

    def __init__(self, dim: int, heads: int, ffn_dim: int, dropout: float, layers: int):
        super().__init__()
        self.layers = nn.ModuleList(GraphDecoderLayer(dim, heads, ffn_dim, dropout) for _ in range(layers))
        self.pos_enc = SinePositionalEncoding(dim // 2)
        self.ref_point_head = nn.Sequential(nn.Linear(dim, dim), nn.GELU(), nn.Linear(dim, dim))
        self.norm = nn.LayerNorm(dim)

    def forward(self, kp, memory, pos, proposal_local, kp_mask, adj, offset_heads: list[OffsetHead]):
        mask = fix_all_masked(kp_mask)  # (B, K)
        padding = ~mask
        adj_n = normalized_adjacency(adj, mask)  # (B, 2, K, K)
        points = proposal_local.detach()  # (B, K, 2)
        points_in = [points]
        feats = []
        x = kp
        for i, layer in enumerate(self.layers):
            # layer 0: from the un-detached proposal (reference quirk), then from detached points
            qpos = self.ref_point_head(self.pos_enc.coordinates(proposal_local if i == 0 else points))
            x = layer(x, memory, pos, qpos, padding, adj_n)  # (B, K, d)
            feats.append(self.norm(x))
            if i + 1 < len(self.layers):  # the last layer's in-loop update is unused (skipped)
                new = refine(points, offset_heads[i](x))  # (B, K, 2) from un-normed features
                points_in.append(new)
                points = new.detach()
        return torch.stack(feats), points_in
