"""Dual-Stream Feature Refinement, DSFR (paper Sec. 3.5, Eq. 4, 6, 7 and 8).

    e_joint^img = MLP(CrossAttn(q = e_joint, k, v = e'_img))                               (Eq. 6)
    e_joint^cls = MLP(CrossAttn(q = e_joint, k, v = e'_cls))                               (Eq. 7)
    e'_joint    = MLP(alpha ⊙ e_joint^img + beta ⊙ e_joint^cls + e_joint)                  (Eq. 8)

As the reference computes it (``SimpleMultiModalModule``; CLIP space, C = 512), with
:class:`~capenext.models.hcmi.AttentionLayer` as "CrossAttn + MLP":
    a_cls = AttentionLayer(e_joint, e'_cls, e'_cls);  a_img = AttentionLayer(e_joint, e'_img, e'_img)
    g_cls = sigmoid(Linear_C→1(a_cls));  g_img = sigmoid(Linear_C→1(a_img))    joint-wise gates (B, K, 1)
    w     = g_cls ⊙ a_cls + g_img ⊙ a_img
    w     = LN(w + Drop(FFN(w)))
    out   = LN(e_joint + Drop(w))
Where the paper and the reference differ (we follow the reference): Eq. 8 puts the MLP after the
residual sum with e_joint; the reference applies FFN + LN to the gated sum first and then adds e_joint
(through dropout) and normalises, so Eq. 4's residual ``e_joint + DSFR(...)`` ends in a LayerNorm.
Each gate is computed from its own stream's attention output. With a single key/value token the
softmax is 1, so each cross-attention returns the projected value for every joint (modulo attention
dropout); the joint-specific part enters through the AttentionLayer residuals.

Ablations (paper Table 2/3): ``gated=False`` (``no_lw``) has no gate parameters and behaves as gates = 1;
one stream (``img_only``/``cls_only``) keeps that stream's attention and gate only.
:class:`ProjectionFusion` is the ``no_dsfr`` replacement described in Sec. 4.3 (not in the reference):
``e'_joint = e_joint + ReLU(Linear(e'_img)) + ReLU(Linear(e'_cls))``.
"""

from __future__ import annotations

import torch
from torch import nn

from capenext.models.hcmi import FFN, AttentionLayer

__all__ = ["DSFR", "ProjectionFusion"]


class DSFR(nn.Module):
    """Eq. 4/6-8 over the streams in ``streams`` (subset of ``("img", "cls")``).

    forward(e_joint (B, K, C), e_img (B, 1, C) | None, e_cls (B, 1, C) | None)
        → (e'_joint (B, K, C), gates: dict name → (B, K) in [0, 1], e.g. ``{"img": ..., "cls": ...}``).
    """

    def __init__(self, dim: int, heads: int, ffn_dim: int, dropout: float,
                 streams: tuple[str, ...] = ("img", "cls"), gated: bool = True):
        super().__init__()
        if not streams or set(streams) - {"img", "cls"}:
            raise ValueError(f"DSFR streams={streams!r}; valid: a non-empty subset of ('img', 'cls')")
        self.streams = tuple(streams)
        self.attn = nn.ModuleDict({s: AttentionLayer(dim, heads, ffn_dim, dropout) for s in self.streams})
        self.gate = nn.ModuleDict({s: nn.Linear(dim, 1) for s in self.streams}) if gated else None
        self.ffn = FFN(dim, ffn_dim, dropout)
        self.norm_w = nn.LayerNorm(dim)
        self.norm_out = nn.LayerNorm(dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, e_joint: torch.Tensor, e_img: torch.Tensor | None, e_cls: torch.Tensor | None):
        kv = {"img": e_img, "cls": e_cls}
        w = torch.zeros_like(e_joint)  # (B, K, C)
        gates: dict[str, torch.Tensor] = {}
        for s in self.streams:
            if kv[s] is None:
                raise ValueError(f"DSFR stream {s!r} needs its embedding; got None")
            a = self.attn[s](e_joint, kv[s], kv[s])  # (B, K, C)
            if self.gate is not None:
                g = torch.sigmoid(self.gate[s](a))  # (B, K, 1) joint-wise gate
                gates[s] = g.squeeze(-1)  # (B, K)
                a = g * a
            w = w + a
        w = self.norm_w(w + self.dropout(self.ffn(w)))  # (B, K, C)
        return self.norm_out(e_joint + self.dropout(w)), gates  # (B, K, C)


class ProjectionFusion(nn.Module):
    """``no_dsfr``: two ReLU-activated linear projections added to e_joint (paper Sec. 4.3).

    forward(e_joint (B, K, C), e_img (B, 1, C), e_cls (B, 1, C)) → (e'_joint (B, K, C), {}).
    """

    def __init__(self, dim: int, streams: tuple[str, ...] = ("img", "cls")):
        super().__init__()
        self.streams = tuple(streams)
        self.proj = nn.ModuleDict({s: nn.Sequential(nn.Linear(dim, dim), nn.ReLU()) for s in self.streams})

    def forward(self, e_joint: torch.Tensor, e_img: torch.Tensor | None, e_cls: torch.Tensor | None):
        kv = {"img": e_img, "cls": e_cls}
        out = e_joint
        for s in self.streams:
            out = out + self.proj[s](kv[s])  # (B, K, C) + (B, 1, C)
        return out, {}
