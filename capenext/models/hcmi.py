"""Hierarchical Cross-Modal Interaction, HCMI (paper Sec. 3.4, Eq. 3 and Eq. 5).

    e'_img, e'_cls = MLP(SelfAttn(concat(e_img, e_cls)))                                  (Eq. 5)

As the reference computes it (``SimpleMultiModalModule``, CLIP space, C = 512):
    t = [e_cls, e_img]                          (B, 2, C), class token first
    x = AttentionLayer(t, t, t)
    x = LN(x + Drop(FFN(x)))                    → e'_cls = x[:, 0], e'_img = x[:, 1]

:class:`AttentionLayer` is the reference's post-norm block, shared with DSFR:
    h   = LN1(q + Drop(MHA(q, k, v)))
    out = LN2(q + Drop(FFN(h)))
Reference quirk (kept): the second residual adds the original ``q``, not ``h``.
Eq. 5 writes concat(e_img, e_cls); the reference orders the tokens [e_cls, e_img]. Self-attention
without positions is permutation-equivariant, so the two orders give the same e'_img and e'_cls.

With one stream (ablations ``img_only``/``cls_only``) the token sequence has length 1, as the
reference's ``SimpleMultiModalWithout{CategoryText,QueryImg}Embedding``. Parameters keep PyTorch's
default init, as in the reference (its ``init_weights`` never reaches the fusion module). The
reference's ``non_linear`` FFN is defined but never used; it is left out (conversion drops it).
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["FFN", "HCMI", "AttentionLayer"]


class FFN(nn.Sequential):
    """Linear → ReLU → Dropout → Linear (the reference's ``ffn``/``inter_ffn``/``weighted_ffn``)."""

    def __init__(self, dim: int, hidden: int, dropout: float):
        super().__init__(nn.Linear(dim, hidden), nn.ReLU(), nn.Dropout(dropout), nn.Linear(hidden, dim))


class AttentionLayer(nn.Module):
    """Post-norm attention block; the FFN residual adds the original query (reference quirk)."""

    def __init__(self, dim: int, heads: int, ffn_dim: int, dropout: float):
        super().__init__()
        self.attn = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.dropout = nn.Dropout(dropout)
        self.ffn = FFN(dim, ffn_dim, dropout)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q (B, Nq, C), k and v (B, Nk, C) → (B, Nq, C)."""
        h = self.norm1(q + self.dropout(self.attn(q, k, v, need_weights=False)[0]))  # (B, Nq, C)
        return self.norm2(q + self.dropout(self.ffn(h)))  # (B, Nq, C)


class HCMI(nn.Module):
    """Eq. 5 over the streams present: ``forward(e_img, e_cls)`` with either one ``None``.

    Inputs: e_img (B, C) or None, e_cls (B, C) or None (at least one).
    Outputs: (e'_img, e'_cls), each (B, 1, C) or None, ready as DSFR keys/values.
    """

    def __init__(self, dim: int, heads: int, ffn_dim: int, dropout: float):
        super().__init__()
        self.attn = AttentionLayer(dim, heads, ffn_dim, dropout)
        self.ffn = FFN(dim, ffn_dim, dropout)
        self.norm = nn.LayerNorm(dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, e_img: torch.Tensor | None, e_cls: torch.Tensor | None):
        streams = [e for e in (e_cls, e_img) if e is not None]  # class token first, as the reference
        if not streams:
            raise ValueError("HCMI needs an image or a class embedding; got neither")
        t = torch.stack(streams, dim=1)  # (B, T, C), T in {1, 2}
        x = self.attn(t, t, t)  # (B, T, C)
        x = self.norm(x + self.dropout(self.ffn(x)))  # (B, T, C)
        parts = list(x.split(1, dim=1))  # T x (B, 1, C)
        out_cls = parts.pop(0) if e_cls is not None else None
        out_img = parts.pop(0) if e_img is not None else None
        return out_img, out_cls
