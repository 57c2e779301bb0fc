"""One config per run: nested dataclasses, JSON presets looked up by name, ``--a.b=v`` overrides.

A run is fully described by a :class:`RunCfg` (``RunCfg{data, model, optim}``). Presets live in
``capenext/configs/*.json`` and are looked up by file stem (``tiny``, ``swinv2_t`` ...), as open_clip
looks up its model configs. Overrides are dotted keys (``model.ablation=no_hcmi``); an unknown key is an
error naming the valid ones. The resolved config is flattened with :func:`flatten` for MLflow params.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

CONFIG_DIR = Path(__file__).parent / "configs"

MAX_KEYPOINTS = 100  # keypoint slots per sample, as the reference pads to 100
THRESHOLDS = (0.05, 0.1, 0.15, 0.2, 0.25)  # PCK thresholds reported by the paper


@dataclass
class DataCfg:
    image_size: int = 256  # side of the square top-down crop fed to the backbone
    heatmap_size: int = 64  # side of the target heatmap
    sigma: float = 1.0  # Gaussian sigma of the target heatmap, in heatmap pixels
    bbox_scale: float = 1.25  # the square bbox is scaled by this before the crop
    max_keypoints: int = MAX_KEYPOINTS
    # training augmentation, as the reference: scale ~ clip(N(1, s), 1-f, 1+f) ...
    scale_sigma: float = 0.15
    scale_clip: float = 0.15
    # ... rotation ~ clip(N(0, r), -2r, 2r) degrees, applied with probability rot_prob
    rot_sigma: float = 15.0
    rot_prob: float = 0.6
    # decode a JPEG only at the resolution its crop needs (DCT-domain 1/2, 1/4, 1/8 while the crop still
    # reads >= 2 reduced pixels per crop pixel): a deviation from the reference's full-resolution decode
    # in the pixels (smoother), not in the targets; False: the reference's decode
    reduced_decode: bool = False
    # optional descriptions file: the reference's rules (python -m pipelines.descriptions) or a CapeX-style
    # json of category name -> keypoint texts
    descriptions: str | None = None
    text_variant: str = "regular"  # which of the reference's texts a rules file gives (its test_type)
    episodes: str = "ours"  # test episodes: "ours" (seeded sampler) or "reference" (mmpose's, from the annotation file)
    val_episodes: int = 100  # per category
    test_episodes: int = 200  # per category
    queries: int = 15  # queries per episode


@dataclass
class ModelCfg:
    backbone: str = "swinv2_t"  # registered backbone name (capenext.models.backbone)
    ablation: str = "full"  # registered ablation name (capenext.models.capenext)
    backbone_checkpoint: str | None = None  # local file with pretrained backbone weights
    clip_model: str = "ViT-B-32"  # open_clip model name, or "tiny"
    clip_checkpoint: str | None = None  # local file, or "random" for explicit random init
    clip_quick_gelu: bool = True  # QuickGELU, as OpenAI's CLIP weights (the reference's); False for LAION weights
    clip_precision: str = "fp32"  # "fp32", or "fp16" as the reference runs CLIP on a GPU (CUDA only)
    # keypoint texts and class prompts: "clip" (CLIP's text tower, the paper's) or a packaged language prior
    # (capenext.models.text_prior: "wordllama", "e5"); the image embedding stays CLIP's either way
    text_encoder: str = "clip"
    # CLIP image input: "clip" (CLIP's own mean/std, ours) or "imagenet" (the reference: the
    # ImageNet-normalised crop as is; converted official checkpoints were trained that way)
    clip_image_norm: str = "clip"
    image_embedding: str = "precomputed"  # "precomputed" (input tensor) or "online" (inside forward)
    # the pose model's precision: "fp32" (the reference's, and the paper recipe's), or "bf16" autocast on
    # CUDA (faster; an opt-in, its PCK cost to be measured on the GPU)
    precision: str = "fp32"
    dim: int = 256  # transformer width d
    heads: int = 8
    enc_layers: int = 3
    dec_layers: int = 3
    ffn_dim: int = 768
    dropout: float = 0.1
    fusion_ffn_dim: int = 2048  # FFN width inside HCMI/DSFR (CLIP space)
    fusion_heads: int = 8
    # stochastic depth of the backbone; None: the backbone's reference value (0.2 for Swin V2 as the
    # reference's configs, 0 for the ViTs); a backbone without drop path refuses a non-zero value
    drop_path: float | None = None


@dataclass
class OptimCfg:
    lr: float = 1e-5
    weight_decay: float = 0.0
    warmup_iters: int = 1000
    warmup_ratio: float = 0.001
    epochs: int = 200
    lr_steps: tuple[float, ...] = (0.8, 0.9)  # fractions of the epochs where lr is divided by 10
    batch_size: int = 32  # global batch, fixed whatever the number of workers
    heatmap_weight: float = 2.0  # lambda_heatmap of Eq. 11
    seed: int = 0
    # Adam as one fused kernel over all parameters (the reference's torch.optim.Adam steps each tensor in
    # turn): the same update, summed in another order, so weights can differ in the last bits
    fused_adam: bool = True


@dataclass
class RunCfg:
    data: DataCfg = field(default_factory=DataCfg)
    model: ModelCfg = field(default_factory=ModelCfg)
    optim: OptimCfg = field(default_factory=OptimCfg)


def available_presets() -> list[str]:
    return sorted(p.stem for p in CONFIG_DIR.glob("*.json"))


def _build(cls: type, values: dict[str, Any], where: str) -> Any:
    """Typed dataclass from a (nested) dict; unknown keys are an error naming the valid ones."""
    known = {f.name: f for f in fields(cls)}
    kwargs = {}
    for key, value in values.items():
        if key not in known:
            raise KeyError(f"unknown config key {where}{key!r}; valid: {sorted(known)}")
        sub = known[key].default_factory if known[key].default_factory is not dataclasses.MISSING else None
        if sub is not None and dataclasses.is_dataclass(sub):
            value = _build(sub, value, f"{where}{key}.")
        elif isinstance(value, list):
            value = tuple(value)
        kwargs[key] = value
    return cls(**kwargs)


def from_dict(values: dict[str, Any]) -> RunCfg:
    return _build(RunCfg, values, "")


def load_preset(name: str) -> RunCfg:
    """The preset ``capenext/configs/<name>.json`` as a :class:`RunCfg`."""
    path = CONFIG_DIR / f"{name}.json"
    if not path.is_file():
        raise KeyError(f"config preset {name!r} not found; available: {available_presets()}")
    return from_dict(json.loads(path.read_text()))


def _parse_value(text: str, current: Any, annotation: str = "") -> Any:
    """``text`` as the field's type: from its current value, or (a ``None`` default) its annotation."""
    base = annotation.replace(" ", "").split("|")
    if text.lower() == "none" and "None" in base:
        return None
    if current is None and annotation:
        kind = next((b for b in base if b != "None"), "str")
        if kind in ("int", "float"):
            return {"int": int, "float": float}[kind](text)
    if isinstance(current, bool):
        if text.lower() not in ("true", "false", "1", "0"):
            raise ValueError(f"expected true/false, got {text!r}")
        return text.lower() in ("true", "1")
    if isinstance(current, tuple):
        return tuple(float(x) for x in text.split(",") if x)
    if current is None or isinstance(current, str):
        return None if text.lower() == "none" else text
    return type(current)(text)


def override(cfg: RunCfg, dotted: dict[str, str]) -> RunCfg:
    """Apply ``{"model.ablation": "no_hcmi", ...}``; unknown keys raise naming the valid ones."""
    cfg = from_dict(to_dict(cfg))
    for key, text in dotted.items():
        parts = key.split(".")
        node = cfg
        for part in parts[:-1]:
            if not dataclasses.is_dataclass(node) or not hasattr(node, part):
                raise KeyError(f"unknown config key {key!r}")
            node = getattr(node, part)
        if not dataclasses.is_dataclass(node) or parts[-1] not in {f.name for f in fields(node)}:
            valid = sorted(flatten(to_dict(cfg)))
            raise KeyError(f"unknown config key {key!r}; valid: {valid}")
        annotation = str({f.name: f.type for f in fields(node)}[parts[-1]])
        try:
            setattr(node, parts[-1], _parse_value(text, getattr(node, parts[-1]), annotation))
        except ValueError as err:
            raise ValueError(f"config key {key!r}: {err}") from None
    return cfg


def parse_sets(items: list[str]) -> dict[str, str]:
    """``["optim.lr=2e-5", "model.ablation = no_hcmi"]`` → ``{"optim.lr": "2e-5", ...}``; one line for an
    item without ``=``."""
    out = {}
    for item in items:
        if "=" not in item:
            raise ValueError(f"--set expects KEY=VALUE, got {item!r}")
        key, value = item.split("=", 1)
        if not key.strip():
            raise ValueError(f"--set expects KEY=VALUE, got {item!r}")
        out[key.strip()] = value.strip()
    return out


def default_preset(backbone: str | None) -> str:
    """The preset a run starts from when none is named: ``tiny`` for the tiny backbone, else ``swinv2_t``."""
    return "tiny" if backbone == "tiny" else "swinv2_t"


def resolve(preset: str | None, named: dict[str, Any], sets: list[str]) -> RunCfg:
    """Preset (default by :func:`default_preset` of ``named["model.backbone"]``), then the named options
    that are not ``None``, then the ``--set`` items: the run's full config."""
    cfg = load_preset(preset or default_preset(named.get("model.backbone")))
    dotted = {k: str(v) for k, v in named.items() if v is not None}
    dotted.update(parse_sets(sets))
    return override(cfg, dotted)


def to_dict(cfg: RunCfg) -> dict[str, Any]:
    return asdict(cfg)


def flatten(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"model": {"ablation": "full"}}`` → ``{"model.ablation": "full"}`` (for MLflow params)."""
    out: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out
