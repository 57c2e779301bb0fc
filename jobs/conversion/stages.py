"""The parity check's inputs, its stages, the forward hooks that capture them on both models, and the
per-stage comparison and report (``jobs.parity``)."""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from capenext.cli import UsageError

DEFAULT_PERTURB = "encoder.layers.1.linear1.weight"
MAX_SLOTS = 100


@dataclass
class ParityInputs:
    """One batch, the same for both models: query crops, per sample its category, keypoint texts, the
    support's visibility (holes = invisible keypoints) and skeleton edges."""

    img: torch.Tensor  # (B, 3, S, S) ImageNet-normalised-like
    categories: list[str]
    names: list[list[str]]
    visible: list[list[int]]
    skeletons: list[list[list[int]]]

    @property
    def kp_mask(self) -> torch.Tensor:
        """(B, 100) bool, True where the support shows the keypoint."""
        m = torch.zeros(len(self.names), MAX_SLOTS, dtype=torch.bool)
        for b, vis in enumerate(self.visible):
            m[b, : len(vis)] = torch.tensor(vis, dtype=torch.bool)
        return m

    @property
    def adjacency(self) -> torch.Tensor:
        """(B, 100, 100) 0/1, symmetric skeleton adjacency."""
        a = torch.zeros(len(self.names), MAX_SLOTS, MAX_SLOTS)
        for b, edges in enumerate(self.skeletons):
            for i, j in edges:
                a[b, i, j] = a[b, j, i] = 1.0
        return a


def make_inputs(seed: int = 0, size: int = 256) -> ParityInputs:
    """Two categories of different keypoint counts, each support hiding some keypoints."""
    g = torch.Generator().manual_seed(seed)
    return ParityInputs(
        img=torch.randn(2, 3, size, size, generator=g),
        categories=["cat_face", "chair"],
        names=[["left eye", "right eye", "nose", "left ear", "right ear"],
               ["seat front left", "seat front right", "seat back left", "seat back right", "leg front left",
                "leg front right", "backrest top left", "backrest top right"]],
        visible=[[1, 0, 1, 1, 1], [1, 1, 0, 1, 1, 0, 1, 1]],
        skeletons=[[[0, 1], [0, 2], [1, 2], [0, 3], [1, 4]],
                   [[0, 1], [1, 3], [3, 2], [2, 0], [0, 4], [1, 5], [2, 6], [3, 7], [6, 7]]],
    )


@dataclass(frozen=True)
class Stage:
    key: str
    label: str
    kind: str = "whole"  # "whole", "slots" (slot axis 1) or "tokens" (image tokens then slots on axis 1)


def stages(enc_layers: int = 3, dec_layers: int = 3) -> list[Stage]:
    """Every compared stage, in forward order."""
    out = [Stage("clip.joint", "CLIP keypoint text embeddings", "slots"),
           Stage("clip.class", "CLIP class embeddings"),
           Stage("clip.image", "CLIP image embeddings"),
           Stage("hcmi.class", "HCMI e'_cls"),
           Stage("hcmi.image", "HCMI e'_img"),
           Stage("dsfr", "DSFR e'_joint", "slots"),
           Stage("backbone", "backbone map (Swin V2, upsampled)"),
           Stage("input_proj", "input projection"),
           *(Stage(f"encoder.{i}", f"encoder layer {i}", "tokens") for i in range(enc_layers)),
           Stage("similarity", "similarity maps", "slots"),
           Stage("proposal", "proposals (whole-map soft-argmax)", "slots"),
           Stage("proposal_local", "proposals (3x3 local)", "slots"),
           *(Stage(f"decoder.{i}", f"decoder layer {i}", "slots") for i in range(dec_layers)),
           *(Stage(f"points.{i}", f"points after decoder layer {i}" if i < dec_layers - 1 else "final points",
                   "slots") for i in range(dec_layers))]
    return out


def expected_stage(key: str, dec_layers: int = 3) -> str | None:
    """The first stage (label) that a perturbed parameter of *our* model changes, or None if not known."""
    rules = [
        (r"clip\.model\.visual\.", "CLIP image embeddings"),
        (r"clip\.model\.", "CLIP keypoint text embeddings"),
        (r"hcmi\.", "HCMI e'_cls"),
        (r"dsfr\.", "DSFR e'_joint"),
        (r"backbone\.trunk\.", "backbone map (Swin V2, upsampled)"),
        (r"backbone\.proj\.", "input projection"),
        (r"joint_proj\.", "encoder layer 0"),
        (r"encoder\.layers\.(\d+)\.", "encoder layer {0}"),
        (r"proposal\.", "similarity maps"),
        (r"decoder\.ref_point_head\.", "decoder layer 0"),
        (r"decoder\.layers\.(\d+)\.", "decoder layer {0}"),
        (r"decoder\.norm\.", "points after decoder layer 0"),
        (r"offset_heads\.(\d+)\.", None),
    ]
    for pattern, label in rules:
        m = re.match(pattern, key)
        if not m:
            continue
        if label is None:  # offset head i moves the points of layer i and the queries of layer i + 1
            i = int(m[1])
            return f"decoder layer {i + 1}" if i + 1 < dec_layers else "final points"
        return label.format(*m.groups())
    return None


class Capture:
    """Forward hooks that record named tensors; ``close()`` removes them."""

    def __init__(self):
        self.values: dict[str, torch.Tensor] = {}
        self._handles: list = []

    def output(self, module: nn.Module, fn: Callable[[Any], dict[str, torch.Tensor]]) -> None:
        self._handles.append(module.register_forward_hook(
            lambda _m, _args, out: self.values.update(fn(out))))

    def inputs(self, module: nn.Module, fn: Callable[[tuple, dict], dict[str, torch.Tensor]]) -> None:
        self._handles.append(module.register_forward_pre_hook(
            lambda _m, args, kwargs: self.values.update(fn(args, kwargs)), with_kwargs=True))

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()


def _det(t: torch.Tensor) -> torch.Tensor:
    return t.detach().float().cpu().clone()


def our_batch(model: nn.Module, inputs: ParityInputs) -> dict[str, torch.Tensor]:
    """Our model's batch: keypoint texts and class prompts through our frozen CLIP, visible slots only."""
    clip = model.clip
    kp_emb = torch.zeros(len(inputs.names), MAX_SLOTS, clip.embed_dim)
    for b, (names, vis) in enumerate(zip(inputs.names, inputs.visible)):
        idx = [i for i, v in enumerate(vis) if v]
        kp_emb[b, idx] = clip.encode_text([names[i] for i in idx]).cpu()
    return {"img": inputs.img, "kp_emb": kp_emb, "kp_mask": inputs.kp_mask, "adj": inputs.adjacency,
            "cls_emb": clip.encode_class(inputs.categories).cpu()}


@torch.no_grad()
def run_ours(model: nn.Module, inputs: ParityInputs) -> dict[str, torch.Tensor]:
    """Every stage of our model on ``inputs``, batch first, slots on axis 1."""
    cap = Capture()
    if model.hcmi is not None:
        cap.inputs(model.hcmi, lambda a, kw: {"clip.image": _det(a[0]), "clip.class": _det(a[1])})
        cap.output(model.hcmi, lambda o: {"hcmi.image": _det(o[0][:, 0]), "hcmi.class": _det(o[1][:, 0])})
    if model.dsfr is not None:
        cap.inputs(model.dsfr, lambda a, kw: {"clip.joint": _det(a[0])})
        cap.output(model.dsfr, lambda o: {"dsfr": _det(o[0])})
    cap.inputs(model.backbone.proj, lambda a, kw: {"backbone": _det(a[0])})
    cap.output(model.backbone.proj, lambda o: {"input_proj": _det(o)})
    for i, layer in enumerate(model.encoder.layers):
        cap.output(layer, lambda o, i=i: {f"encoder.{i}": _det(o)})
    cap.output(model.proposal, lambda o: {"similarity": _det(o[0]), "proposal": _det(o[1]),
                                          "proposal_local": _det(o[2])})
    for i, layer in enumerate(model.decoder.layers):
        cap.output(layer, lambda o, i=i: {f"decoder.{i}": _det(o)})
    try:
        out = model(our_batch(model, inputs))
    finally:
        cap.close()
    values = dict(cap.values)
    for i, p in enumerate(out["points"]):  # (L, B, K, 2)
        values[f"points.{i}"] = _det(p)
    values["_hw"] = torch.tensor(values["input_proj"].shape[-2] * values["input_proj"].shape[-1])
    return values


def reference_batch(inputs: ParityInputs) -> dict[str, Any]:
    """The reference's ``predict`` arguments: one support shot, its visibility as ``target_weight_s``."""
    import numpy as np

    b = len(inputs.names)
    weight = inputs.kp_mask.float().unsqueeze(-1)  # (B, 100, 1)
    # the reference's datasets hand the model category names with '_' replaced by ' '
    metas = [{"sample_point_descriptions": [np.array(names)], "sample_skeleton": [edges], "query_skeleton": edges,
              "query_category_name": cat.replace("_", " "), "sample_image_file": [f"parity_{i}.jpg"]}
             for i, (names, edges, cat) in enumerate(zip(inputs.names, inputs.skeletons, inputs.categories))]
    return {"img_s": [inputs.img.clone()], "target_s": [torch.zeros(b, MAX_SLOTS, 64, 64)],
            "target_weight_s": [weight], "img_q": inputs.img, "img_metas": metas}


@torch.no_grad()
def run_reference(model: nn.Module, inputs: ParityInputs) -> dict[str, torch.Tensor]:
    """Every stage of the reference CapeXModel on ``inputs``, in our layout (batch first, slots on axis 1)."""
    cap = Capture()
    fusion = model.additional_module
    cap.inputs(fusion.inter_attention_layer, lambda a, kw: {"clip.class": _det(kw["query"][:, 0]),
                                                            "clip.image": _det(kw["query"][:, 1])})
    cap.inputs(fusion.text_cross_attention_layer, lambda a, kw: {"clip.joint": _det(kw["query"])})
    cap.output(fusion.norm1, lambda o: {"hcmi.class": _det(o[:, 0]), "hcmi.image": _det(o[:, 1])})
    cap.output(fusion.norm3, lambda o: {"dsfr": _det(o)})
    head = model.keypoint_head
    cap.inputs(head.input_proj, lambda a, kw: {"backbone": _det(a[0])})
    cap.output(head.input_proj, lambda o: {"input_proj": _det(o)})
    tr = head.transformer
    for i, layer in enumerate(tr.encoder.layers):  # (hw + 100, B, d)
        cap.output(layer, lambda o, i=i: {f"encoder.{i}": _det(o.transpose(0, 1))})
    cap.output(tr.proposal_generator, lambda o: {"proposal": _det(o[0]), "similarity": _det(o[1]),
                                                 "proposal_local": _det(o[2])})
    for i, layer in enumerate(tr.decoder.layers):  # (100, B, d)
        cap.output(layer, lambda o, i=i: {f"decoder.{i}": _det(o[0].transpose(0, 1))})
    cap.output(head, lambda o: {f"points.{i}": _det(p) for i, p in enumerate(o[0])})
    try:
        model.predict(**reference_batch(inputs))
    finally:
        cap.close()
    values = dict(cap.values)
    values["_hw"] = torch.tensor(values["input_proj"].shape[-2] * values["input_proj"].shape[-1])
    return values


def _slots(t: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    k = t.shape[1]
    if bool(mask[:, k:].any()):
        raise ValueError(f"a stage holds {k} slots but the batch has valid slots beyond them")
    return t[mask[:, :k]]


def select(stage: Stage, t: torch.Tensor, mask: torch.Tensor, hw: int) -> torch.Tensor:
    """The meaningful part of a stage: all of it, or only the valid slots (and all image tokens)."""
    if stage.kind == "slots":
        return _slots(t, mask)
    if stage.kind == "tokens":
        return torch.cat((t[:, :hw].flatten(), _slots(t[:, hw:], mask).flatten()))
    return t


@dataclass
class Row:
    label: str
    max_abs: float
    scale: float  # max |reference| of the stage
    ok: bool
    note: str = ""


@dataclass
class Report:
    rows: list[Row] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(r.ok for r in self.rows)

    @property
    def first_failure(self) -> str | None:
        return next((r.label for r in self.rows if not r.ok), None)

    def table(self) -> str:
        width = max(len(r.label) for r in self.rows)
        lines = [f"  {'stage':<{width}}  {'max |ref - ours|':>16}  {'max |ref|':>10}  result"]
        for r in self.rows:
            lines.append(f"  {r.label:<{width}}  {r.max_abs:>16.3e}  {r.scale:>10.3e}  "
                         f"{'ok' if r.ok else 'PAST TOLERANCE'}{'  ' + r.note if r.note else ''}")
        return "\n".join(lines)


def compare(ref: dict[str, torch.Tensor], ours: dict[str, torch.Tensor], mask: torch.Tensor,
            atol: float = 1e-5, rtol: float = 1e-4, stage_list: list[Stage] | None = None) -> Report:
    """Per stage: the largest difference on its valid part; past tolerance when above ``atol + rtol * scale``."""
    report = Report()
    hw = int(ref["_hw"])
    for stage in stage_list or stages():
        if stage.key not in ref or stage.key not in ours:
            side = "reference" if stage.key not in ref else "ours"
            report.rows.append(Row(stage.label, math.nan, math.nan, False, f"not captured ({side})"))
            continue
        a, b = select(stage, ref[stage.key], mask, hw), select(stage, ours[stage.key], mask, hw)
        if a.shape != b.shape:
            report.rows.append(Row(stage.label, math.nan, math.nan, False,
                                   f"shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}"))
            continue
        diff = float((a - b).abs().max()) if a.numel() else 0.0
        scale = float(a.abs().max()) if a.numel() else 0.0
        finite = bool(torch.isfinite(a).all() and torch.isfinite(b).all())
        ok = finite and diff <= atol + rtol * scale
        report.rows.append(Row(stage.label, diff, scale, ok, "" if finite else "non-finite values"))
    return report


@torch.no_grad()
def perturb(model: nn.Module, key: str, amount: float = 0.5, seed: int = 0) -> None:
    """Add seeded N(0, 1) noise times ``amount`` x the tensor's std (at least 0.01) to our parameter ``key``.

    The whole tensor moves: a single element can sit behind a ReLU that is off for every input."""
    params = dict(model.named_parameters())
    if key not in params:
        raise UsageError(f"--perturb {key!r}: our model has no such parameter (e.g. {DEFAULT_PERTURB})")
    p = params[key]
    std = float(p.float().std()) if p.numel() > 1 else 0.0
    noise = torch.randn(p.shape, generator=torch.Generator().manual_seed(seed))
    p.add_((amount * max(std, 1e-2) * noise).to(p.dtype))
