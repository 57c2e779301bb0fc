"""The frozen CLIP (paper Sec. 3.3; Radford et al. 2021): joint, class and image embeddings.

CapeNext encodes three things with one frozen CLIP (ViT-B-32, OpenAI's weights in the reference):
- keypoint texts, raw (no template), L2-normalised: the joint embeddings e_joint of Eq. 4;
- the class prompt ``a photo of {name}`` (underscores → spaces), L2-normalised: e_cls of Eq. 3;
- the query crop, L2-normalised: e_img of Eq. 3.

The model comes from ``open_clip.create_model``; our own architectures (``tiny``) are JSON configs in
``capenext/models/clip_configs/`` registered with open_clip at import. Weights are explicit: a local
file (``--clip-checkpoint PATH``; OpenAI TorchScript archives go through
``open_clip.load_openai_model``) or ``"random"``; neither is an error, so a real run never uses a
random CLIP by accident. The wrapper is always in eval mode, its parameters never require grad and
every encode runs under ``torch.no_grad``.

Deviation from the reference (named): the reference feeds CLIP's image tower the augmented query
crop *still ImageNet-normalised*, resized to 224. :meth:`FrozenCLIP.encode_image` undoes the ImageNet
normalisation and applies CLIP's own mean/std before the (bilinear, align_corners=False) resize.
``ModelCfg.clip_image_norm="imagenet"`` keeps the reference's input instead; ``jobs.convert`` sets it
for the published checkpoints, which were trained that way.
"""

from __future__ import annotations

import logging
import zipfile
from contextlib import contextmanager
from pathlib import Path

import open_clip
import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["CLIP_CONFIG_DIR", "FrozenCLIP", "build_clip", "class_prompt"]

CLIP_CONFIG_DIR = Path(__file__).parent / "clip_configs"
open_clip.add_model_config(CLIP_CONFIG_DIR)

RANDOM_CLIP_SEED = 0  # the explicit "random" CLIP is the same everywhere
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def class_prompt(name: str) -> str:
    """The class prompt of the reference: ``a photo of {name}``, underscores → spaces."""
    return f"a photo of {name.replace('_', ' ')}"


def _is_torchscript(path: str) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as zf:
        return any(n.endswith("constants.pkl") for n in zf.namelist())


@contextmanager
def _quiet_random_init():
    # open_clip warns "No pretrained weights loaded" on the root logger; random init is asked for here
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        yield
    finally:
        logging.disable(previous)


def build_clip(model_name: str, checkpoint: str | None, quick_gelu: bool = True) -> nn.Module:
    """The open_clip model ``model_name`` with weights from ``checkpoint`` (a file or ``"random"``)."""
    if checkpoint is None:
        raise ValueError(
            "ModelCfg.clip_checkpoint is not set: pass --clip-checkpoint PATH (CLIP weights, a local file) "
            "or --clip-checkpoint random (explicit random init, tests and smoke runs only)")
    available = open_clip.list_models()
    if model_name not in available:
        ours = sorted(p.stem for p in CLIP_CONFIG_DIR.glob("*.json"))
        raise KeyError(f"ModelCfg.clip_model={model_name!r} not found; available: {ours} or any open_clip "
                       f"config (e.g. 'ViT-B-32', 'ViT-B-16')")
    if checkpoint == "random":
        # seeded, so that every process (embedding actors, training workers, prediction) builds the same
        # random CLIP and precomputed embeddings match the model's own; the global RNG is left untouched
        with _quiet_random_init(), torch.random.fork_rng(devices=[]):
            torch.manual_seed(RANDOM_CLIP_SEED)
            return open_clip.create_model(model_name, pretrained=None, force_quick_gelu=quick_gelu)
    if not Path(checkpoint).is_file():
        raise FileNotFoundError(f"ModelCfg.clip_checkpoint={checkpoint!r}: no such file (or use 'random')")
    if _is_torchscript(checkpoint):  # OpenAI's released ViT-B-32.pt
        return open_clip.load_openai_model(checkpoint, precision="fp32", device="cpu")
    return open_clip.create_model(model_name, pretrained=checkpoint, force_quick_gelu=quick_gelu)


class FrozenCLIP(nn.Module):
    """Frozen open_clip model with CapeNext's prompts; every output is L2-normalised float32.

    Attributes:
        embed_dim: C, the joint embedding width (512 for ViT-B-32).
        image_size: side the crop is resized to for the image tower (224 for ViT-B-32).
    """

    def __init__(self, model_name: str = "ViT-B-32", checkpoint: str | None = None, quick_gelu: bool = True,
                 image_norm: str = "clip"):
        super().__init__()
        if image_norm not in ("clip", "imagenet"):
            raise ValueError(f"ModelCfg.clip_image_norm={image_norm!r}; valid: ['clip', 'imagenet']")
        self.model = build_clip(model_name, checkpoint, quick_gelu)
        self.model_name = model_name
        self.tokenizer = open_clip.get_tokenizer(model_name)
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.embed_dim = int(self.model.text_projection.shape[1])
        size = self.model.visual.image_size
        self.image_size = tuple(size) if isinstance(size, (tuple, list)) else (size, size)
        mean = torch.tensor(getattr(self.model.visual, "image_mean", None) or open_clip.OPENAI_DATASET_MEAN)
        std = torch.tensor(getattr(self.model.visual, "image_std", None) or open_clip.OPENAI_DATASET_STD)
        # x_clip = (x_imagenet * s_in + m_in - m_clip) / s_clip = x_imagenet * scale + shift
        scale = torch.tensor(IMAGENET_STD) / std
        shift = (torch.tensor(IMAGENET_MEAN) - mean) / std
        if image_norm == "imagenet":  # the reference's quirk: the ImageNet-normalised crop goes in as is
            scale, shift = torch.ones(3), torch.zeros(3)
        self.image_norm = image_norm
        self.register_buffer("_scale", scale.view(1, 3, 1, 1), persistent=False)
        self.register_buffer("_shift", shift.view(1, 3, 1, 1), persistent=False)
        self.train(False)

    def train(self, mode: bool = True) -> "FrozenCLIP":
        """Always eval (dropout off, as the reference's ``text_backbone.eval()``), whatever ``mode``."""
        return super().train(False)

    @property
    def device(self) -> torch.device:
        return self._scale.device

    @torch.no_grad()
    def encode_text(self, texts: list[str]) -> torch.Tensor:
        """Raw texts (no template) → (T, C) L2-normalised; keypoint descriptions use this."""
        if len(texts) == 0:
            return torch.zeros(0, self.embed_dim, device=self.device)
        tokens = self.tokenizer(list(texts)).to(self.device)  # (T, L)
        emb = self.model.encode_text(tokens).float()  # (T, C)
        return F.normalize(emb, dim=-1)

    def encode_class(self, names: list[str]) -> torch.Tensor:
        """Category names → (T, C) L2-normalised embeddings of ``a photo of {name}``."""
        return self.encode_text([class_prompt(n) for n in names])

    @torch.no_grad()
    def encode_image(self, img: torch.Tensor) -> torch.Tensor:
        """ImageNet-normalised crops (B, 3, S, S) → (B, C) L2-normalised, with CLIP's own normalisation."""
        x = img.float() * self._scale + self._shift  # (B, 3, S, S) CLIP-normalised
        if tuple(x.shape[-2:]) != self.image_size:
            x = F.interpolate(x, size=self.image_size, mode="bilinear", align_corners=False)
        emb = self.model.encode_image(x).float()  # (B, C)
        return F.normalize(emb, dim=-1)
