"""CapeNext assembled from a :class:`~capenext.config.ModelCfg` (paper Sec. 3, Fig. 2; ablations Sec. 4.3).

    e'_img, e'_cls = HCMI(e_img, e_cls)                               (Eq. 3, hcmi.py)
    e'_joint       = DSFR(e_joint, e'_img, e'_cls)                    (Eq. 4, dsfr.py)
    kp             = Linear_C→d(e'_joint ⊙ mask)                      (heads.py)
    memory, kp     = Encoder([backbone(img); kp])                     (encoder.py)
    sim, proposals = ProposalGenerator(memory, kp)                    (proposal.py)
    points         = GraphDecoder(kp, memory, proposals) + offsets    (graph_decoder.py, heads.py)

Ablations are registered by function name with :func:`register_ablation` (paper Tables 2 and 3):

| name       | streams   | HCMI | fusion            | gates |
|------------|-----------|------|-------------------|-------|
| full       | img, cls  | yes  | DSFR              | yes   |
| no_hcmi    | img, cls  | no   | DSFR (raw e_img, e_cls as keys/values) | yes |
| no_dsfr    | img, cls  | yes  | 2 ReLU projections added to e_joint | no |
| no_lw      | img, cls  | yes  | DSFR              | no (= 1) |
| baseline   | none      | no   | none (CapeX)      | no    |
| img_only   | img       | yes  | DSFR, image stream | yes  |
| cls_only   | cls       | yes  | DSFR, class stream | yes  |

Initialisation follows the reference: xavier-uniform weights and zero biases for every Linear/Conv of
the joint projection, encoder, proposal generator, decoder and offset heads (MultiheadAttention keeps
its own xavier in-projection), the offset heads' last layer zero; HCMI/DSFR keep PyTorch's defaults.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from capenext.config import ModelCfg
from capenext.models.backbone import create_backbone
from capenext.models.clip import FrozenCLIP
from capenext.models.dsfr import DSFR, ProjectionFusion
from capenext.models.encoder import SinePositionalEncoding, TransformerEncoder
from capenext.models.graph_decoder import GraphDecoder
from capenext.models.hcmi import HCMI
from capenext.models.heads import JointProjection, OffsetHead, refine
from capenext.models.proposal import ProposalGenerator

__all__ = [
    "ABLATIONS", "Ablation", "CapeNext", "available_ablations", "build_model", "get_ablation",
    "parameter_counts", "register_ablation",
]

IMAGE_EMBEDDING_MODES = ("precomputed", "online")


@dataclass(frozen=True)
class Ablation:
    """What an ablation keeps: the embedding streams, HCMI, the fusion kind and the gates."""

    name: str
    streams: tuple[str, ...] = ()  # subset of ("img", "cls") feeding HCMI/DSFR
    hcmi: bool = False
    fusion: str | None = None  # "dsfr", "projection" or None
    gated: bool = False  # learnable joint-wise gates (LW)


ABLATIONS: dict[str, Callable[[], Ablation]] = {}


def register_ablation(fn: Callable[[], Ablation]) -> Callable[[], Ablation]:
    """Register ``fn`` (returns an :class:`Ablation`) under its own name; re-registering warns."""
    if fn.__name__ in ABLATIONS:
        warnings.warn(f"ablation {fn.__name__!r} registered twice; the later one wins", stacklevel=2)
    ABLATIONS[fn.__name__] = fn
    return fn


def available_ablations() -> list[str]:
    return sorted(ABLATIONS)


def get_ablation(name: str) -> Ablation:
    if name not in ABLATIONS:
        raise KeyError(f"ModelCfg.ablation={name!r} not registered; available: {available_ablations()}")
    return ABLATIONS[name]()


@register_ablation
def full() -> Ablation:
    return Ablation("full", ("img", "cls"), hcmi=True, fusion="dsfr", gated=True)


@register_ablation
def no_hcmi() -> Ablation:
    return Ablation("no_hcmi", ("img", "cls"), hcmi=False, fusion="dsfr", gated=True)


@register_ablation
def no_dsfr() -> Ablation:
    return Ablation("no_dsfr", ("img", "cls"), hcmi=True, fusion="projection", gated=False)


@register_ablation
def no_lw() -> Ablation:
    return Ablation("no_lw", ("img", "cls"), hcmi=True, fusion="dsfr", gated=False)


@register_ablation
def baseline() -> Ablation:
    return Ablation("baseline")


@register_ablation
def img_only() -> Ablation:
    return Ablation("img_only", ("img",), hcmi=True, fusion="dsfr", gated=True)


@register_ablation
def cls_only() -> Ablation:
    return Ablation("cls_only", ("cls",), hcmi=True, fusion="dsfr", gated=True)


def _pad_slots(v: torch.Tensor, extra: int, slot_dim: int) -> torch.Tensor:
    """Zero-pad ``extra`` slots at the end of dimension ``slot_dim``."""
    return F.pad(v, (0, 0) * (v.dim() - 1 - slot_dim) + (0, extra))


def _xavier_(module: nn.Module) -> None:
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d)):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


class CapeNext(nn.Module):
    """The CapeNext model for one ablation x backbone.

    ``forward(batch)`` takes a dict of tensors (K = 100 slots, C = CLIP width, S = crop side):
        img (B, 3, S, S) ImageNet-normalised query crop;
        kp_emb (B, K, C) L2-normalised keypoint text embeddings, zero in padded/invisible slots;
        kp_mask (B, K) bool, True where the slot holds a support-visible keypoint;
        adj (B, K, K) 0/1 skeleton adjacency;
        cls_emb (B, C) class embedding (only if ``needs_class_embedding``);
        img_emb (B, C) CLIP image embedding (only if ``needs_image_embedding`` and
        ``image_embedding == "precomputed"``; with "online" it is computed from ``img``).
    and returns a dict:
        sim (B, K, h, w) similarity maps; proposal (B, K, 2) whole-map soft-argmax (supervised);
        proposal_local (B, K, 2) 3x3-window proposal the decoder starts from; points (L, B, K, 2) output
        points of each decoder layer (the last is the prediction); all points in [0, 1] crop
        coordinates (x, y); gate_img, gate_cls (B, K) in [0, 1] for gated ablations.
    """

    def __init__(self, cfg: ModelCfg):
        super().__init__()
        if cfg.image_embedding not in IMAGE_EMBEDDING_MODES:
            raise ValueError(f"ModelCfg.image_embedding={cfg.image_embedding!r}; valid: {list(IMAGE_EMBEDDING_MODES)}")
        self.cfg = cfg
        self.ablation = ab = get_ablation(cfg.ablation)
        self.image_embedding = cfg.image_embedding
        self.precision = cfg.precision  # fp32, or bf16 autocast on CUDA (capenext.engine.autocast)
        self.needs_image_embedding = "img" in ab.streams
        self.needs_class_embedding = "cls" in ab.streams
        self.trim_slots = True  # compute only up to the last valid slot (see forward)
        d = cfg.dim

        self.clip = FrozenCLIP.from_cfg(cfg)
        c = self.clip.embed_dim
        self.backbone = create_backbone(cfg.backbone, dim=d, checkpoint=cfg.backbone_checkpoint,
                                        drop_path=cfg.drop_path)
        fusion_args = (c, cfg.fusion_heads, cfg.fusion_ffn_dim, cfg.dropout)
        self.hcmi = HCMI(*fusion_args) if ab.hcmi else None
        # the fusion of e_img/e_cls into the joint embeddings: DSFR, or (no_dsfr) two ReLU projections
        self.dsfr = DSFR(*fusion_args, streams=ab.streams, gated=ab.gated) if ab.fusion == "dsfr" else None
        self.projection = ProjectionFusion(c, streams=ab.streams) if ab.fusion == "projection" else None
        self.joint_proj = JointProjection(c, d)
        self.pos_enc = SinePositionalEncoding(d // 2)
        self.encoder = TransformerEncoder(d, cfg.heads, cfg.ffn_dim, cfg.dropout, cfg.enc_layers)
        self.proposal = ProposalGenerator(d)
        self.decoder = GraphDecoder(d, cfg.heads, cfg.ffn_dim, cfg.dropout, cfg.dec_layers)
        self.offset_heads = nn.ModuleList(OffsetHead(d) for _ in range(cfg.dec_layers))

        for part in (self.joint_proj, self.encoder, self.proposal, self.decoder, self.offset_heads):
            _xavier_(part)
        for head in self.offset_heads:
            head.reset_last()

    def _embeddings(self, batch: dict[str, torch.Tensor], image: dict[str, torch.Tensor] | None = None):
        e_img = e_cls = None
        if self.needs_image_embedding:
            if self.image_embedding == "online":
                # (B, C): from encode_image's output when the image part ran apart, else here
                e_img = image["img_emb"] if image is not None else self.clip.encode_image(batch["img"])
            elif "img_emb" not in batch:
                raise KeyError(f"ablation {self.ablation.name!r} with image_embedding='precomputed' needs "
                               "batch['img_emb'] (B, C); set model.image_embedding=online to compute it")
            else:
                e_img = batch["img_emb"]
        if self.needs_class_embedding:
            if "cls_emb" not in batch:
                raise KeyError(f"ablation {self.ablation.name!r} needs batch['cls_emb'] (B, C)")
            e_cls = batch["cls_emb"]
        return e_img, e_cls

    @staticmethod
    def active_slots(kp_mask: torch.Tensor) -> int:
        """1 + the last slot index that is valid in any sample of the batch (at least 1); one host sync."""
        k = kp_mask.shape[1]
        last = (kp_mask.any(0) * torch.arange(1, k + 1, device=kp_mask.device)).max()
        return max(int(last), 1)

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """See the class docstring. Slots after the batch's last valid slot are not computed.

        Implementation detail (not in the reference): padded slots are masked everywhere (encoder keys,
        decoder self-attention, adjacency, loss), so computing them cannot change the valid slots; with
        ``trim_slots`` (default) only the first :meth:`active_slots` slots run through the model and the
        outputs of the others are zero-filled. MP-100 has 9-68 keypoints per category, so this skips most
        of the 100 slots.
        """
        return self._slots(batch, None)

    def encode_image(self, img: torch.Tensor) -> dict[str, torch.Tensor]:
        """The part of the forward that depends on the query crop alone: ``{"feat": (B, d, h, w) backbone
        map}``, plus ``"img_emb"`` (B, C) the CLIP image embedding when the model computes it
        (``image_embedding == "online"`` with an image stream).

        Text-only CAPE reads nothing of the support but its keypoint texts and visibility, so the test
        protocol (:func:`capenext.protocol.run_protocol`) runs this once per query crop and :meth:`head`
        once per (query, support mask); ``head(encode_image(img), batch)`` is ``forward(batch)``.
        """
        out = {"feat": self.backbone(img)}  # (B, d, h, w)
        if self.needs_image_embedding and self.image_embedding == "online":
            out["img_emb"] = self.clip.encode_image(img)  # (B, C)
        return out

    def head(self, image: dict[str, torch.Tensor], batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The rest of the forward, given :meth:`encode_image`'s output for the batch's queries: fusion,
        joint projection, encoder, proposals, decoder. ``batch`` as for :meth:`forward` without ``img``."""
        return self._slots(batch, image)

    def _slots(self, batch: dict[str, torch.Tensor], image: dict[str, torch.Tensor] | None
               ) -> dict[str, torch.Tensor]:
        """The forward over the first :meth:`active_slots` slots, the others zero-filled (see forward)."""
        kp_mask = batch["kp_mask"].bool()
        k_all = kp_mask.shape[1]
        k = self.active_slots(kp_mask) if self.trim_slots else k_all
        out = self._forward(batch.get("img"), batch["kp_emb"][:, :k], kp_mask[:, :k], batch["adj"][:, :k, :k],
                            batch, image)
        if k < k_all:  # zero-fill the slots that were not computed, keeping (B, 100, ...) outputs
            out = {name: _pad_slots(v, k_all - k, slot_dim=2 if name == "points" else 1) for name, v in out.items()}
        return out

    def _forward(self, img: torch.Tensor | None, e_joint: torch.Tensor, kp_mask: torch.Tensor, adj: torch.Tensor,
                 batch: dict[str, torch.Tensor], image: dict[str, torch.Tensor] | None = None
                 ) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}  # e_joint (B, K, C), kp_mask (B, K), adj (B, K, K)
        fusion = self.dsfr if self.dsfr is not None else self.projection
        if fusion is not None:
            e_img, e_cls = self._embeddings(batch, image)  # (B, C) each, or None
            if self.hcmi is not None:
                e_img, e_cls = self.hcmi(e_img, e_cls)  # (B, 1, C) each, or None
            else:
                e_img = e_img.unsqueeze(1) if e_img is not None else None
                e_cls = e_cls.unsqueeze(1) if e_cls is not None else None
            e_joint, gates = fusion(e_joint, e_img, e_cls)  # (B, K, C)
            out.update({f"gate_{k}": g for k, g in gates.items()})
        kp = self.joint_proj(e_joint, kp_mask)  # (B, K, d)

        # the backbone after the fusion, as always: in training the order of random draws (dropout,
        # drop path) stays that of the reference
        feat = self.backbone(img) if image is None else image["feat"]  # (B, d, h, w)
        b, _, h, w = feat.shape
        pos = self.pos_enc(h, w, device=feat.device).to(feat.dtype)  # (1, d, h, w)
        memory, kp = self.encoder(feat, kp, pos, kp_mask)  # (B, hw, d), (B, K, d)
        sim, proposal, proposal_local = self.proposal(memory, kp, (h, w))  # (B, K, h, w), 2 x (B, K, 2)
        pos_tokens = pos.flatten(2).transpose(1, 2).expand(b, -1, -1)  # (B, hw, d)
        feats, points_in = self.decoder(kp, memory, pos_tokens, proposal_local, kp_mask, adj,
                                        self.offset_heads)  # (L, B, K, d), L x (B, K, 2)
        points = torch.stack([refine(p, head(f)) for p, head, f in zip(points_in, self.offset_heads, feats)])
        out.update(sim=sim, proposal=proposal, proposal_local=proposal_local, points=points)  # points (L, B, K, 2)
        return out


def build_model(cfg: ModelCfg) -> CapeNext:
    """Any registered ablation x backbone from ``cfg`` (``cfg.clip_checkpoint`` must be a file or "random")."""
    return CapeNext(cfg)


def parameter_counts(model: nn.Module) -> dict[str, int]:
    """{"trainable": ..., "frozen": ...} parameter counts (frozen = the CLIP)."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    return {"trainable": trainable, "frozen": frozen}
