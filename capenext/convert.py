"""The published CapeNext and CapeX weights (mmpose 0.29 / mmcv checkpoints) → our model's state_dict.

The reference (yzrs/CapeNext, matanr/capex: ``models/models/detectors/capex.py::CapeXModel``) holds four
modules, and every tensor of its state_dict has exactly one place here or a named reason to be left out:

| reference                                          | ours                   | how |
|----------------------------------------------------|------------------------|-----|
| ``backbone.*`` (Microsoft Swin V2 code)            | ``backbone.trunk.*``   | :func:`swinv2_to_timm` |
| ``keypoint_head.input_proj``                       | ``backbone.proj``      | rename |
| ``keypoint_head.text_proj``                        | ``joint_proj``         | rename |
| ``keypoint_head.kpt_branch.L.mlp.{0,2,4,6}``       | ``offset_heads.L.{hidden.0,hidden.1,hidden.2,out}`` | rename |
| ``keypoint_head.transformer.encoder``              | ``encoder``            | rename |
| ``keypoint_head.transformer.proposal_generator``   | ``proposal``           | rename |
| ``keypoint_head.transformer.decoder``              | ``decoder``            | rename, see below |
| ``additional_module.*`` (CapeNext only)            | ``hcmi.*``, ``dsfr.*`` | :data:`FUSION_TABLE` |
| ``text_backbone.*`` (OpenAI CLIP ViT-B/32)         | ``clip.model.*``       | rename (same names in open_clip) |

In the decoder, ``multihead_attn`` → ``cross_attn``, ``ffn2`` → ``linear2``, ``ref_point_head.layers.{0,1}``
→ ``ref_point_head.{0,2}``, and the GCN's ``ffn1.conv`` (``Conv1d(d, 2 * 768, kernel_size=1)``) → ``gcn.linear``
with its weight squeezed from (out, in, 1) to (out, in): the only reshape. No split or transpose is needed:
the attention in-projections stay fused as in PyTorch's ``MultiheadAttention``, and timm's Swin V2 keeps
Microsoft's ``q_bias``/``v_bias``, ``cpb_mlp`` and ``logit_scale`` (the GELUs of the MLP heads hold no weights).

Left out, each for a stated reason (:data:`DROPPED`): the Swin buffers ``relative_position_index``,
``relative_coords_table`` and ``attn_mask`` (timm recomputes them; they are compared with timm's values,
so a checkpoint with another window size cannot slip through), the Swin code's ImageNet classifier
``backbone.head`` (built with ``num_classes=1000``, never called: the detector uses ``forward_features``)
and ``SimpleMultiModalModule.non_linear`` (built, never used in ``forward``).

The mapping is one table of :class:`Rule` (official ↔ ours, with layer-index fields), read in both
directions: official → ours to place every tensor, ours → official to name the source of a missing one.
:func:`convert_state_dict` checks the architecture first (kind, Swin depths, text width: one clear
problem), then everything key by key; any unmapped or missing key and any shape mismatch is a problem
naming both keys, and :class:`ConversionError` carries them all. Nothing is loaded unless all map.
Tensors keep their dtype here (the reference's CLIP is partly fp16); loading into the model casts.

Not convertible, and refused in one line: CapeX's own published weights (matanr/capex ``configs/tiny``
and ``configs/small``) use the GTE-base text encoder (``text_proj`` 768 → 256) and, for CapeX-S, Swin
V2-S; our model reads CLIP ViT-B/32 text embeddings (512 wide) and has no GTE. ``capex`` here is CapeX
with CLIP ViT-B/32 (``configs/clip/`` of both repositories), our ``baseline``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch
from torch import nn

__all__ = [
    "DROPPED", "FUSION_TABLE", "KINDS", "RULES", "SWIN_RULES", "Conversion", "ConversionError", "Rule",
    "convert_state_dict", "dropped_reason", "official_key", "our_key", "swinv2_to_timm",
]

KINDS = {"capenext": "full", "capex": "baseline"}  # official kind → our ablation

_FIELD = re.compile(r"\{(\w+)([+-]\d+)?\}")


class Rule:
    """``official`` ↔ ``ours`` key templates; ``{i}`` matches a layer index, ``{i+1}`` the same index plus one.

    A template ending in ``.`` (or empty) is a prefix and the rest of the key is carried over; any other
    template is a whole key. ``transform`` says how the tensor changes on the way to ours.
    """

    def __init__(self, official: str, ours: str, transform: str = "copy"):
        self.official, self.ours, self.transform = official, ours, transform
        self._official_re = self._compile(official)
        self._ours_re = self._compile(ours)

    @staticmethod
    def _compile(template: str) -> re.Pattern:
        parts, pos = [], 0
        for m in _FIELD.finditer(template):
            parts.append(re.escape(template[pos:m.start()]))
            parts.append(f"(?P<{m[1]}>\\d+)")
            pos = m.end()
        parts.append(re.escape(template[pos:]))
        prefix = template == "" or template.endswith(".")
        return re.compile("".join(parts) + ("" if prefix else "$"))

    @staticmethod
    def _offsets(template: str) -> dict[str, int]:
        return {m[1]: int(m[2] or 0) for m in _FIELD.finditer(template)}

    def _apply(self, key: str, src: str, src_re: re.Pattern, dst: str) -> str | None:
        m = src_re.match(key)
        if m is None:
            return None
        src_off = self._offsets(src)
        values = {name: int(m[name]) - off for name, off in src_off.items()}  # the field's own value
        if any(v < 0 for v in values.values()):
            return None
        out = _FIELD.sub(lambda f: str(values[f[1]] + int(f[2] or 0)), dst)
        return out + key[m.end():]

    def to_ours(self, official: str) -> str | None:
        return self._apply(official, self.official, self._official_re, self.ours)

    def to_official(self, ours: str) -> str | None:
        return self._apply(ours, self.ours, self._ours_re, self.official)

    def __repr__(self) -> str:
        return f"Rule({self.official!r} ↔ {self.ours!r}, {self.transform})"


# Microsoft's Swin V2 code (the reference's models/models/backbones/swin_transformer_v2.py) → timm. Same module
# names (q_bias/v_bias, cpb_mlp, logit_scale, norm1/norm2 as res-post-norms, patch_embed, norm), except that
# Microsoft puts stage i's PatchMerging at the end of stage i and timm at the start of stage i + 1.
SWIN_RULES = [
    Rule("layers.{i}.downsample.", "layers.{i+1}.downsample."),
    Rule("", ""),
]
SWIN_BUFFERS = ("relative_position_index", "relative_coords_table", "attn_mask")

# SimpleMultiModalModule (models/models/additional_modules/fuse_feature_module.py) → HCMI + DSFR
FUSION_TABLE = {
    "inter_attention_layer": "hcmi.attn",  # self-attention over [e_cls, e_img] (Eq. 5)
    "inter_ffn": "hcmi.ffn",
    "norm1": "hcmi.norm",
    "text_cross_attention_layer": "dsfr.attn.cls",  # joints attend to e'_cls (Eq. 7)
    "image_cross_attention_layer": "dsfr.attn.img",  # joints attend to e'_img (Eq. 6)
    "weight_category": "dsfr.gate.cls",  # joint-wise gates (Eq. 8)
    "weight_image": "dsfr.gate.img",
    "weighted_ffn": "dsfr.ffn",
    "norm2": "dsfr.norm_w",
    "norm3": "dsfr.norm_out",
}

_H = "keypoint_head."
_T = "keypoint_head.transformer."
RULES = [
    *(Rule("backbone." + r.official, "backbone.trunk." + r.ours) for r in SWIN_RULES),
    Rule(_H + "input_proj.", "backbone.proj."),
    Rule(_H + "text_proj.", "joint_proj."),
    # TokenDecodeMLP: Sequential(Linear, GELU, Linear, GELU, Linear, GELU, Linear)
    Rule(_H + "kpt_branch.{l}.mlp.0.", "offset_heads.{l}.hidden.0."),
    Rule(_H + "kpt_branch.{l}.mlp.2.", "offset_heads.{l}.hidden.1."),
    Rule(_H + "kpt_branch.{l}.mlp.4.", "offset_heads.{l}.hidden.2."),
    Rule(_H + "kpt_branch.{l}.mlp.6.", "offset_heads.{l}.out."),
    Rule(_T + "encoder.layers.", "encoder.layers."),
    Rule(_T + "proposal_generator.", "proposal."),
    Rule(_T + "decoder.layers.{i}.multihead_attn.", "decoder.layers.{i}.cross_attn."),
    # GCNLayer.conv is Conv1d(d, 2 * 768, kernel_size=1); ours is the same map as a Linear
    Rule(_T + "decoder.layers.{i}.ffn1.conv.weight", "decoder.layers.{i}.gcn.linear.weight", "squeeze(-1)"),
    Rule(_T + "decoder.layers.{i}.ffn1.conv.bias", "decoder.layers.{i}.gcn.linear.bias"),
    Rule(_T + "decoder.layers.{i}.ffn2.", "decoder.layers.{i}.linear2."),
    Rule(_T + "decoder.layers.", "decoder.layers."),  # self_attn, choker, norm1-3
    # MLP(layers=[Linear, Linear], GELU between) → Sequential(Linear, GELU, Linear)
    Rule(_T + "decoder.ref_point_head.layers.0.", "decoder.ref_point_head.0."),
    Rule(_T + "decoder.ref_point_head.layers.1.", "decoder.ref_point_head.2."),
    Rule(_T + "decoder.norm.", "decoder.norm."),
    *(Rule(f"additional_module.{a}.", f"{b}.") for a, b in FUSION_TABLE.items()),
    Rule("text_backbone.", "clip.model."),  # OpenAI's CLIP and open_clip share the module names
]

DROPPED = [
    (re.compile(r"^backbone\..*\.(" + "|".join(SWIN_BUFFERS) + r")$"),
     "Swin V2 buffer: timm recomputes it (compared with timm's values)"),
    (re.compile(r"^backbone\.head\."), "the Swin code's ImageNet classifier: never called (forward_features only)"),
    (re.compile(r"^additional_module\.non_linear\."), "SimpleMultiModalModule.non_linear: built, never used"),
]

_TRANSFORMS = {
    "copy": lambda t: t,
    "squeeze(-1)": lambda t: t.squeeze(-1) if t.dim() > 0 and t.shape[-1] == 1 else t,
}


def our_key(official: str, rules: list[Rule] = RULES) -> tuple[str, str] | None:
    """``(our key, transform)`` for an official key (first matching rule), or None."""
    for rule in rules:
        ours = rule.to_ours(official)
        if ours is not None:
            return ours, rule.transform
    return None


def official_key(ours: str, rules: list[Rule] = RULES) -> tuple[str, str] | None:
    """``(official key, transform)`` for one of our keys (first matching rule), or None."""
    for rule in rules:
        official = rule.to_official(ours)
        if official is not None:
            return official, rule.transform
    return None


def dropped_reason(official: str) -> str | None:
    """Why an official key is left out, or None if it must be mapped."""
    for pattern, why in DROPPED:
        if pattern.search(official):
            return why
    return None


class ConversionError(ValueError):
    """Some tensors do not map; ``problems`` holds one line per problem, naming both keys."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        head = self.problems[0] if self.problems else "conversion failed"
        more = f" (and {len(self.problems) - 1} more problems)" if len(self.problems) > 1 else ""
        super().__init__(head + more)


@dataclass
class Conversion:
    """The result of :func:`convert_state_dict`.

    state: our key → tensor for everything but the CLIP (source dtype, transform applied);
    clip: open_clip key (no ``clip.model.`` prefix) → tensor, or None when the file holds no CLIP;
    source_of: our key → the official key it came from (CLIP included, with its ``clip.model.`` key);
    dropped: official key → why it was left out.
    """

    kind: str
    state: dict[str, torch.Tensor]
    clip: dict[str, torch.Tensor] | None
    source_of: dict[str, str] = field(default_factory=dict)
    dropped: dict[str, str] = field(default_factory=dict)


def _shape(t: torch.Tensor) -> tuple[int, ...]:
    return tuple(t.shape)


def _check_buffer(official: str, value: torch.Tensor, ours: str, buffers: dict[str, torch.Tensor]) -> str | None:
    """A Swin buffer must equal timm's recomputed one: same window size, shift and pretrained window size."""
    mine = buffers.get(ours)
    if mine is None:
        return (f"official {official!r} {_shape(value)} → ours {ours!r}: timm has no such buffer (a shifted-window "
                "block in the file is not shifted here: another window size or input size)")
    if _shape(mine) != _shape(value):
        return (f"official {official!r} {_shape(value)} → ours {ours!r} {_shape(mine)}: shape mismatch (another "
                "window size)")
    if not torch.allclose(value.detach().to(torch.float64), mine.detach().to(torch.float64), atol=1e-4):
        return (f"official {official!r} → ours {ours!r}: values differ from timm's recomputed buffer (another "
                "window size or pretrained window size)")
    return None


def swinv2_to_timm(state: dict[str, torch.Tensor], trunk: nn.Module | None = None):
    """A Microsoft-format Swin V2 state_dict (keys as in its code) → timm's, for ``trunk`` if given.

    Returns ``(state, dropped, problems)``: ``layers.N.downsample`` becomes ``layers.N+1.downsample``;
    the buffers ``relative_position_index``, ``relative_coords_table`` and ``attn_mask`` are dropped after
    being compared with ``trunk``'s recomputed ones (a problem line each if they differ); ``head.*`` (the
    ImageNet classifier) is dropped. The same job as timm's ``swin_transformer_v2.checkpoint_filter_fn``,
    with the buffers checked instead of skipped.
    """
    buffers = dict(trunk.named_buffers()) if trunk is not None else {}
    out, dropped, problems = {}, {}, []
    for key, value in state.items():
        ours = our_key(key, SWIN_RULES)[0]
        if key.rsplit(".", 1)[-1] in SWIN_BUFFERS:
            dropped[key] = "Swin V2 buffer: timm recomputes it"
            if trunk is not None:
                problem = _check_buffer(key, value, ours, buffers)
                if problem:
                    problems.append(problem)
            continue
        if key.startswith("head."):
            dropped[key] = "ImageNet classifier"
            continue
        out[ours] = value
    return out, dropped, problems


def _swin_depths(state: dict[str, torch.Tensor]) -> tuple[int, ...]:
    depth: dict[int, int] = {}
    for key in state:
        m = re.match(r"backbone\.layers\.(\d+)\.blocks\.(\d+)\.", key)
        if m:
            depth[int(m[1])] = max(depth.get(int(m[1]), 0), int(m[2]) + 1)
    return tuple(depth.get(i, 0) for i in range(max(depth) + 1)) if depth else ()


def _architecture_problem(state: dict[str, torch.Tensor], model: nn.Module, kind: str | None):
    """``(detected kind, one problem line or None)``: what the file is, before comparing key by key."""
    tops = sorted({k.split(".", 1)[0] for k in state})
    if "backbone" not in tops or "keypoint_head" not in tops:
        return None, (f"not a CapeNext/CapeX (mmpose CapeXModel) state_dict: its top-level modules are {tops[:8]}; "
                      "expected backbone, keypoint_head, text_backbone (+ additional_module for CapeNext)")
    detected = "capenext" if "additional_module" in tops else "capex"
    if kind is not None and kind != detected:
        why = ("it holds the CapeNext fusion module (additional_module.*)" if detected == "capenext" else
               "it has no fusion module (no additional_module.* keys)")
        return detected, f"--kind {kind} but the file is a {detected} checkpoint: {why}; use --kind {detected}"
    if detected == "capenext":
        names = {k.split(".")[1] for k in state if k.startswith("additional_module.")}
        unknown = sorted(names - set(FUSION_TABLE) - {"non_linear"})
        if unknown:
            return detected, (f"the file's fusion module is not the published CapeNext one (SimpleMultiModalModule): "
                              f"additional_module holds {unknown}; other fusion variants are not supported")
    text_w = state.get(_H + "text_proj.weight")
    if text_w is None:
        return detected, ("the file has no keypoint_head.text_proj.weight: not a text-prompted CapeX/CapeNext head "
                          "(a support-image model such as GraphCape or CapeFormer?)")
    ours_w = model.joint_proj.in_features
    if text_w.dim() != 2 or text_w.shape[1] != ours_w:
        gte = any(k.startswith("text_backbone.embeddings.") for k in state) or text_w.shape[-1] == 768
        hint = (" (CapeX's published weights use the GTE-base text encoder, 768 wide; our model uses CLIP "
                "ViT-B/32 text embeddings, 512 wide, and has no GTE)" if gte else "")
        return detected, (f"official 'keypoint_head.text_proj.weight' {_shape(text_w)} → ours 'joint_proj.weight' "
                          f"{_shape(model.joint_proj.weight)}: the text embeddings are {text_w.shape[-1]} wide, "
                          f"ours {ours_w}{hint}")
    trunk = model.backbone.trunk
    ours_depths = tuple(len(stage.blocks) for stage in trunk.layers)
    depths = _swin_depths(state)
    if not depths:
        v1 = any(k.endswith("relative_position_bias_table") for k in state)
        what = ("a Swin V1 (relative_position_bias_table)" if v1 else
                "not a Swin V2 (no backbone.layers.N.blocks.M keys)")
        return detected, f"the file's backbone is {what}; ours is Swin V2 with depths {ours_depths}"
    embed = state.get("backbone.patch_embed.proj.weight")
    ours_embed = trunk.patch_embed.proj.out_channels
    if depths != ours_depths or (embed is not None and embed.shape[0] != ours_embed):
        names = {((2, 2, 6, 2), 96): "Swin V2-T", ((2, 2, 18, 2), 96): "Swin V2-S",
                 ((2, 2, 18, 2), 128): "Swin V2-B"}
        guess = names.get((depths, int(embed.shape[0]) if embed is not None else None), "another Swin V2")
        width = f", embed {embed.shape[0]}" if embed is not None else ""
        return detected, (f"the file's backbone is {guess} (depths {depths}{width}); ours (swinv2_t) has depths "
                          f"{ours_depths}, embed {ours_embed}")
    return detected, None


def convert_state_dict(state: dict[str, torch.Tensor], model: nn.Module, kind: str | None = None) -> Conversion:
    """Map an official state_dict onto ``model`` (a :class:`~capenext.models.CapeNext` with a Swin V2 backbone).

    ``kind`` ("capenext" or "capex") is checked against the file (detected when None). The CLIP is
    mapped when the file holds it (``text_backbone.*``), else left to the caller. Raises
    :class:`ConversionError` with every problem (one line each, naming both keys); returns a
    :class:`Conversion` otherwise.
    """
    if kind is not None and kind not in KINDS:
        raise ValueError(f"kind={kind!r}; valid: {sorted(KINDS)}")
    detected, problem = _architecture_problem(state, model, kind)
    if problem:
        raise ConversionError([problem])
    kind = detected
    expected_ablation = KINDS[kind]
    if model.ablation.name != expected_ablation:
        raise ValueError(f"a {kind} checkpoint needs a model with ablation {expected_ablation!r}, "
                         f"got {model.ablation.name!r}")

    targets = {k: v for k, v in model.state_dict().items()}
    has_clip = any(k.startswith("text_backbone.") for k in state)
    if not has_clip:
        targets = {k: v for k, v in targets.items() if not k.startswith("clip.")}
    buffers = {k: v for k, v in model.named_buffers()}

    problems: list[str] = []
    reported: set[str] = set()  # our keys already named in a problem
    placed: dict[str, torch.Tensor] = {}
    source_of: dict[str, str] = {}
    dropped: dict[str, str] = {}
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            problems.append(f"official {key!r}: not a tensor ({type(value).__name__})")
            continue
        why = dropped_reason(key)
        mapped = our_key(key)
        if why is not None:
            dropped[key] = why
            if mapped is not None and key.rsplit(".", 1)[-1] in SWIN_BUFFERS:
                problem = _check_buffer(key, value, mapped[0], buffers)
                if problem:
                    problems.append(problem)
            continue
        if mapped is None:
            problems.append(f"official {key!r} {_shape(value)} → ours: nothing (no rule maps this key)")
            continue
        ours, transform = mapped
        if ours not in targets:
            problems.append(f"official {key!r} {_shape(value)} → ours {ours!r}: our model has no such key")
            continue
        if ours in source_of:
            problems.append(f"official {key!r} and {source_of[ours]!r} both map to ours {ours!r}")
            continue
        reported.add(ours)
        tensor = _TRANSFORMS[transform](value)
        if _shape(tensor) != _shape(targets[ours]):
            via = f", {transform} gives {_shape(tensor)}" if transform != "copy" else ""
            problems.append(f"official {key!r} {_shape(value)} → ours {ours!r} {_shape(targets[ours])}: shape "
                            f"mismatch{via}")
            continue
        placed[ours] = tensor
        source_of[ours] = key
    for ours, target in targets.items():
        if ours not in source_of and ours not in reported:
            mapped = official_key(ours)
            src = repr(mapped[0]) if mapped else "(no rule)"
            problems.append(f"official {src} → ours {ours!r} {_shape(target)}: missing from the file")
    if problems:
        raise ConversionError(problems)

    prefix = "clip.model."
    clip = {k[len(prefix):]: v for k, v in placed.items() if k.startswith(prefix)} if has_clip else None
    rest = {k: v for k, v in placed.items() if not k.startswith("clip.")}
    return Conversion(kind=kind, state=rest, clip=clip, source_of=source_of, dropped=dropped)
