"""Image backbones (paper Sec. 3.3, Table 1): timm trunks that end in a 1x1 conv to the width d.

Every backbone maps the ImageNet-normalised query crop (B, 3, S, S) to a feature map (B, d, h, w)
with h = w = 16 at S = 256 (14 for ``vit_b16``, as in the reference). Channel counts are read from
the timm model (``num_features``, ``feature_info``), never hard-coded. The closing 1x1 conv is the
reference's ``PoseHead.input_proj`` (xavier-uniform, zero bias); it lives here so that a backbone is
one swappable unit.

Backbones are registered by function name with :func:`register_backbone` and built with
:func:`create_backbone`, which drops ``None`` overrides so each entry's defaults hold (as timm's
``create_model``). Weights are random unless ``checkpoint`` names a local file; no hub download is
ever tried (the entry points set ``HF_HUB_OFFLINE=1``). timm reads the file (with its own format filters)
for Swin V2 and the ViTs; ``hrnet_w32`` takes the reference's own file, mmpose's ImageNet
``hrnet_w32-36af842e.pth``, loaded strictly by :mod:`capenext.models.backbone_weights`.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Callable

import timm
import torch
import torch.nn.functional as F
from torch import nn

from capenext.models.backbone_weights import LoadedWeights, load_hrnet_weights

__all__ = ["BACKBONES", "Backbone", "available_backbones", "create_backbone", "register_backbone"]

BACKBONES: dict[str, Callable[..., "Backbone"]] = {}


def register_backbone(fn: Callable[..., "Backbone"]) -> Callable[..., "Backbone"]:
    """Register ``fn`` under its own name (timm style); re-registering a name warns and overwrites."""
    if fn.__name__ in BACKBONES:
        warnings.warn(f"backbone {fn.__name__!r} registered twice; the later one wins", stacklevel=2)
    BACKBONES[fn.__name__] = fn
    return fn


def available_backbones() -> list[str]:
    return sorted(BACKBONES)


def create_backbone(name: str, **overrides) -> "Backbone":
    """The registered backbone ``name``; ``None``-valued overrides are dropped so defaults hold."""
    if name not in BACKBONES:
        raise KeyError(f"ModelCfg.backbone={name!r} not registered; available: {available_backbones()}")
    return BACKBONES[name](**{k: v for k, v in overrides.items() if v is not None})


def _checked_file(checkpoint: str | None) -> str | None:
    if checkpoint is not None and not Path(checkpoint).is_file():
        raise FileNotFoundError(f"ModelCfg.backbone_checkpoint={checkpoint!r}: no such file "
                                "(--backbone-checkpoint takes a local weights file)")
    return checkpoint


def _timm(name: str, checkpoint: str | None, **kwargs) -> nn.Module:
    """``timm.create_model`` with random init, or weights from a local file (never the hub)."""
    checkpoint = _checked_file(checkpoint)
    # weights come only from a local file, which timm reads through pretrained_cfg_overlay (applying its
    # Microsoft/original-format filters); without one, random init.
    overlay = {} if checkpoint is None else {"pretrained_cfg_overlay": dict(file=checkpoint)}
    return timm.create_model(name, pretrained=checkpoint is not None, **overlay, **kwargs)


class Backbone(nn.Module):
    """Base class: ``features(img) -> (B, trunk_channels, h, w)`` then ``proj`` (1x1 conv) to d.

    Attributes:
        trunk_channels: channels of the map entering ``proj`` (read from the trunk).
        out_channels: d.
    """

    trunk_channels: int
    out_channels: int

    def _make_proj(self, in_channels: int, dim: int) -> None:
        self.trunk_channels, self.out_channels = in_channels, dim
        self.proj = nn.Conv2d(in_channels, dim, kernel_size=1)
        nn.init.xavier_uniform_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def features(self, img: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        """img (B, 3, S, S) ImageNet-normalised → (B, d, h, w)."""
        return self.proj(self.features(img))


class SwinV2Backbone(Backbone):
    """Swin V2: stage-4 output with the final LayerNorm, NHWC → NCHW, bilinear x2 (reference).

    timm's ``forward_features`` returns the normed stage-4 map in NHWC (``features_only`` would give
    it without that norm), so we take ``forward_features``: (B, 8, 8, 768) at 256 → (B, 768, 16, 16).
    """

    def __init__(self, name: str, dim: int, checkpoint: str | None, drop_path: float):
        super().__init__()
        self.trunk = _timm(name, checkpoint, num_classes=0, drop_path_rate=drop_path)
        self._make_proj(self.trunk.num_features, dim)

    def features(self, img: torch.Tensor) -> torch.Tensor:
        x = self.trunk.forward_features(img)  # (B, h/2, w/2, C) normed
        x = x.permute(0, 3, 1, 2)  # (B, C, h/2, w/2)
        return F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)  # (B, C, h, w)


class HRNetBackbone(Backbone):
    """HRNet: the highest-resolution branch (stride 4), then two Conv3x3/2 + BN + ReLU blocks.

    hrnet_w32 at 256: (B, 32, 64, 64) → (B, 256, 32, 32) → (B, 512, 16, 16), as the reference's
    ``conv_block1``/``conv_block2`` (default PyTorch init, bias-free convs). The last module of stage 4
    keeps only the fuse layers into the highest resolution, as the reference's mmpose HRNet builds it
    (``multiscale_output`` False): timm's trunk would also compute the three lower-resolution outputs,
    whose weights then get no gradient (DDP refuses such parameters) and are not in the reference.

    ``checkpoint``: HRNet-W32 ImageNet weights in HRNet's names (the reference's mmpose
    ``hrnet_w32-36af842e.pth``, or timm's ``hrnet_w32.ms_in1k``), loaded strictly; ``weights`` says what
    was loaded and which file tensors (the ImageNet head) were left out.
    """

    def __init__(self, name: str, dim: int, checkpoint: str | None, widths: tuple[int, int] = (256, 512)):
        super().__init__()
        checkpoint = _checked_file(checkpoint)
        self.trunk = _timm(name, None, features_only=True, feature_location="", out_indices=(1,))
        last = self.trunk.stage4[-1]
        last.fuse_layers = last.fuse_layers[:1]  # into branch 0 only: the output we take
        last.multi_scale_output = False
        self.weights: LoadedWeights | None = None
        if checkpoint is not None:
            self.weights = load_hrnet_weights(self.trunk, checkpoint)
        in_ch = self.trunk.feature_info.channels()[0]
        blocks = []
        for width in widths:
            blocks += [nn.Sequential(
                nn.Conv2d(in_ch, width, kernel_size=3, stride=2, padding=1, bias=False),
                nn.BatchNorm2d(width),
                nn.ReLU(inplace=True),
            )]
            in_ch = width
        self.down = nn.Sequential(*blocks)
        self.branch_channels = self.trunk.feature_info.channels()[0]
        self._make_proj(in_ch, dim)

    def features(self, img: torch.Tensor) -> torch.Tensor:
        x = self.trunk(img)[0]  # (B, 32, S/4, S/4)
        return self.down(x)  # (B, 512, S/16, S/16)


class ViTBackbone(Backbone):
    """Plain ViT: normed tokens without the prefix (CLS/register) tokens, reshaped to a grid.

    The crop is resized (bilinear) to the trunk's input size when it differs: 224 for
    ``vit_base_patch16_224`` (14x14 map) and DINOv2 ViT-S/14 (16x16 map). ``adaptor`` is the
    reference ViT's 1x1 ``channel_adaptor`` (C → C); DINOv2 has none in the reference.
    """

    def __init__(self, name: str, dim: int, checkpoint: str | None, adaptor: bool, **kwargs):
        super().__init__()
        self.trunk = _timm(name, checkpoint, num_classes=0, **kwargs)
        channels = self.trunk.num_features
        self.input_size = tuple(self.trunk.patch_embed.img_size)
        self.grid = tuple(self.trunk.patch_embed.grid_size)
        self.adaptor = nn.Conv2d(channels, channels, kernel_size=1) if adaptor else nn.Identity()
        self._make_proj(channels, dim)

    def features(self, img: torch.Tensor) -> torch.Tensor:
        if tuple(img.shape[-2:]) != self.input_size:
            img = F.interpolate(img, size=self.input_size, mode="bilinear", align_corners=False)
        x = self.trunk.forward_features(img)  # (B, P + h*w, C) after the final norm
        x = x[:, self.trunk.num_prefix_tokens:]  # (B, h*w, C)
        b, n, c = x.shape
        x = x.transpose(1, 2).reshape(b, c, *self.grid)  # (B, C, h, w)
        return self.adaptor(x)


class TinyBackbone(Backbone):
    """A small CNN for tests and the CPU quickstart: four Conv3x3/2 + GroupNorm + ReLU blocks, stride 16."""

    def __init__(self, dim: int, checkpoint: str | None, widths: tuple[int, ...] = (16, 32, 64, 64)):
        super().__init__()
        layers, in_ch = [], 3
        for width in widths:
            # GroupNorm, not BatchNorm: a sample's output must not depend on the per-worker batch, so
            # that DDP on N workers matches one worker on the same global batch (a test checks it)
            layers += [nn.Conv2d(in_ch, width, 3, stride=2, padding=1, bias=False), nn.GroupNorm(8, width),
                       nn.ReLU(inplace=True)]
            in_ch = width
        self.trunk = nn.Sequential(*layers)
        self._make_proj(in_ch, dim)
        checkpoint = _checked_file(checkpoint)
        if checkpoint is not None:
            self.load_state_dict(torch.load(checkpoint, map_location="cpu", weights_only=True))

    def features(self, img: torch.Tensor) -> torch.Tensor:
        return self.trunk(img)  # (B, 64, S/16, S/16)


@register_backbone
def swinv2_t(dim: int = 256, checkpoint: str | None = None, drop_path: float = 0.2) -> Backbone:
    """Swin V2 Tiny, window 16, 256 input (the reference's Microsoft weights); 16x16 map."""
    return SwinV2Backbone("swinv2_tiny_window16_256", dim, checkpoint, drop_path)


WITHOUT_DROP_PATH = ("hrnet_w32", "tiny")  # CNNs: no stochastic depth to set


def check_drop_path(name: str, drop_path: float | None) -> None:
    """One line when a non-zero drop path is asked of a backbone that has none (instead of ignoring it)."""
    if name in WITHOUT_DROP_PATH and drop_path:
        raise ValueError(f"ModelCfg.drop_path={drop_path}: backbone {name!r} has no drop path (stochastic "
                         "depth); leave it unset or 0")


# Drop-path defaults are the reference's (yzrs/CapeNext configs/clip*/): its Swin V2 encoder_config sets
# drop_path_rate=0.2; its HRNet is a CNN without one; its ViT-B/16 and DINOv2 come from timm and
# torch.hub with their constructors' default, 0.


@register_backbone
def hrnet_w32(dim: int = 256, checkpoint: str | None = None, drop_path: float = 0.0) -> Backbone:
    """HRNet-W32, highest-resolution branch + two stride-2 blocks; 16x16 map at 256."""
    check_drop_path("hrnet_w32", drop_path)
    return HRNetBackbone("hrnet_w32", dim, checkpoint)


@register_backbone
def vit_b16(dim: int = 256, checkpoint: str | None = None, drop_path: float = 0.0) -> Backbone:
    """ViT-B/16 at 224 input; 14x14 map (the reference's ViT config crops at 224)."""
    return ViTBackbone("vit_base_patch16_224", dim, checkpoint, adaptor=True, drop_path_rate=drop_path)


@register_backbone
def dinov2_vits(dim: int = 256, checkpoint: str | None = None, drop_path: float = 0.0) -> Backbone:
    """DINOv2 ViT-S/14, the 256 crop resized to 224; last block's normed tokens → 16x16 map."""
    return ViTBackbone("vit_small_patch14_dinov2", dim, checkpoint, adaptor=False, img_size=224,
                       drop_path_rate=drop_path)


@register_backbone
def tiny(dim: int = 64, checkpoint: str | None = None, drop_path: float = 0.0) -> Backbone:
    """Tiny CNN (tests, CPU quickstart); S/16 map."""
    check_drop_path("tiny", drop_path)
    return TinyBackbone(dim, checkpoint)
