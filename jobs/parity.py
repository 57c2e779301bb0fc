"""Parity check against the reference implementation: ``python -m jobs.parity --reference DIR``.

For a user who has a checkout of the official code (yzrs/CapeNext) but no mmcv or mmpose. It:

1. imports the reference's detector (``CapeXModel``), head, transformer, fusion module
   (``SimpleMultiModalModule``) and Swin V2 code from the checkout ``DIR``, with small stand-ins for the
   mmcv/mmpose pieces those files import (registries and builders, ``BaseModule``, ``BasePose``, the
   ``Conv2d``/``Linear`` wrappers, ``xavier_init``, ...). The stand-ins live in ``sys.modules`` only
   while the check runs (:func:`stubbed_imports`); every computation that runs is the reference's own
   code. The package ``__init__`` files that pull in the reference's datasets and training API are not
   executed: the model packages are opened as bare packages and their files imported one by one.
2. builds the reference model from its Swin V2-T CLIP config (``configs/clip/clip_split1_config.py``,
   with ``additional_module_cfg`` from ``configs/info.py`` set to ``SimpleMultiModalModule``, as for the
   published CapeNext weights) at seeded random weights. Every tensor the reference initialises to a
   constant (zero biases, LayerNorm affine, the zero last layer of the offset heads, Swin V2's zero
   res-post-norms, ``q_bias``/``v_bias``, ``logit_scale``) is re-randomised around its value: otherwise
   the offset heads and the Swin blocks would be identities and the check would prove little.
3. writes it as an mmcv checkpoint (``{"meta": ..., "state_dict": ...}``), converts it with
   ``jobs.convert`` and loads the result with :func:`capenext.checkpoint.load_model`.
4. feeds both models the same inputs (a two-category batch, supports with invisible keypoints) and
   compares, through forward hooks on both models, every stage: CLIP embeddings, HCMI, DSFR, the Swin
   map, the input projection, each encoder layer, the similarity maps, both proposals, each decoder
   layer and the points of every decoder layer. It prints the largest difference per stage and exits 1
   when any stage is past the float tolerance.

CLIP: the reference calls OpenAI's ``clip.load("ViT-B/32")``, which needs the ``clip`` package and its
weights. The stand-in ``clip`` module returns our own random CLIP of the same architecture instead
(open_clip ViT-B-32 with QuickGELU, seeded), so both sides see identical CLIP weights: the reference
writes them into its checkpoint as ``text_backbone`` and the conversion carries them over. The CLIP rows
therefore check the plumbing around CLIP (texts, masks, prompts, resizing, normalisation), not OpenAI's
weights.

``--perturb [KEY]`` is the negative control: one of our weight tensors (default
``encoder.layers.1.linear1.weight``) gets seeded noise after the conversion; the check must then fail, first at
the stage that weight feeds (printed as the expected stage).

Only the valid slots (support-visible keypoints) are compared: the reference computes all 100 slots,
ours only up to the batch's last valid one, and padded slots carry no meaning in either.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import math
import re
import runpy
import sys
import tempfile
import types
import warnings
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from capenext.cli import UsageError, run_main

DEFAULT_CONFIG = "configs/clip/clip_split1_config.py"
INFO_CONFIG = "configs/info.py"
FUSION_MODULE = "SimpleMultiModalModule"  # the published CapeNext setting
DEFAULT_PERTURB = "encoder.layers.1.linear1.weight"
MAX_SLOTS = 100
REQUIRED_FILES = (
    "models/models/detectors/capex.py",
    "models/models/keypoint_heads/head.py",
    "models/models/additional_modules/fuse_feature_module.py",
    "models/models/backbones/swin_transformer_v2.py",
    "models/models/utils/__init__.py",
    INFO_CONFIG,
)
# the reference's modules, in import order (each registers its classes in the stand-in registries)
REFERENCE_MODULES = (
    "models.models.backbones.swin_transformer_v2",
    "models.models.utils",
    "models.models.keypoint_heads",
    "models.models.additional_modules.fuse_feature_module",
    "models.models.detectors.capex",
)
# top-level names whose modules are replaced (stand-ins) or loaded from the checkout during the check
STUB_ROOTS = ("mmcv", "mmpose", "clip", "transformers")
REFERENCE_ROOTS = ("models", "configs")


# ----------------------------------------------------------------------------------------------------
# stand-ins for the mmcv / mmpose / clip pieces the reference's model files import


class Registry:
    """mmcv's ``Registry``: ``register_module`` as a decorator or with ``module=``; ``get``; ``build``."""

    def __init__(self, name: str, build_func: Callable | None = None):
        self.name = name
        self._module_dict: dict[str, Any] = {}
        self._build = build_func

    def __contains__(self, key: str) -> bool:
        return key in self._module_dict

    def __len__(self) -> int:
        return len(self._module_dict)

    def get(self, key: str):
        return self._module_dict.get(key)

    def _register(self, module, name=None, force=False):
        names = [name] if isinstance(name, str) else list(name or [module.__name__])
        for n in names:
            if not force and n in self._module_dict:
                raise KeyError(f"{n} is already registered in {self.name}")
            self._module_dict[n] = module

    def register_module(self, name=None, force=False, module=None):
        if module is not None:
            self._register(module, name, force)
            return module

        def decorator(cls):
            self._register(cls, name, force)
            return cls
        return decorator

    def build(self, cfg, default_args=None):
        return (self._build or build_from_cfg)(cfg, self, default_args)


def build_from_cfg(cfg, registry: Registry, default_args=None):
    """mmcv's ``build_from_cfg``: ``cfg["type"]`` names the class (or is one), the rest are arguments."""
    if not isinstance(cfg, dict) or "type" not in cfg:
        raise KeyError(f"a {registry.name} config must be a dict with a 'type'; got {cfg!r}")
    args = dict(cfg)
    for k, v in (default_args or {}).items():
        args.setdefault(k, v)
    kind = args.pop("type")
    cls = registry.get(kind) if isinstance(kind, str) else kind
    if cls is None:
        raise KeyError(f"{kind} is not registered in the {registry.name} registry")
    return cls(**args)


class BaseModule(nn.Module):
    """mmcv's ``BaseModule``: an ``nn.Module`` that accepts ``init_cfg`` (initialisation configs are not
    applied: the check re-randomises the weights anyway)."""

    def __init__(self, init_cfg=None):
        super().__init__()
        self.init_cfg = init_cfg

    def init_weights(self):
        pass


class BasePose(nn.Module):
    """mmpose's ``BasePose``: the detector's base class (its loss parsing and train step are not used)."""


class Conv2d(nn.Conv2d):
    """mmcv's ``Conv2d`` wrapper: ``nn.Conv2d`` (mmcv's adds only empty-tensor handling)."""


class Linear(nn.Linear):
    """mmcv's ``Linear`` wrapper: ``nn.Linear`` (mmcv's adds only empty-tensor handling)."""


def xavier_init(module: nn.Module, gain: float = 1, bias: float = 0, distribution: str = "normal") -> None:
    """mmcv's ``xavier_init``."""
    if getattr(module, "weight", None) is not None:
        if distribution == "uniform":
            nn.init.xavier_uniform_(module.weight, gain=gain)
        else:
            nn.init.xavier_normal_(module.weight, gain=gain)
    if getattr(module, "bias", None) is not None:
        nn.init.constant_(module.bias, bias)


def build_norm_layer(cfg: dict, num_features: int, postfix: Any = ""):
    """mmcv's ``build_norm_layer`` for LayerNorm / BatchNorm: ``(name, layer)``."""
    args = dict(cfg)
    kind = args.pop("type")
    args.pop("requires_grad", None)
    layers = {"LN": nn.LayerNorm, "BN": nn.BatchNorm2d, "BN1d": nn.BatchNorm1d, "BN2d": nn.BatchNorm2d}
    if kind not in layers:
        raise KeyError(f"norm type {kind!r} is not provided by the parity check's mmcv stand-in")
    return f"{kind.lower()}{postfix}", layers[kind](num_features, **args)


def build_activation_layer(cfg: dict) -> nn.Module:
    """mmcv's ``build_activation_layer`` for the usual activations."""
    args = dict(cfg)
    kind = args.pop("type")
    layers = {"ReLU": nn.ReLU, "GELU": nn.GELU, "Sigmoid": nn.Sigmoid, "Tanh": nn.Tanh}
    if kind not in layers:
        raise KeyError(f"activation type {kind!r} is not provided by the parity check's mmcv stand-in")
    return layers[kind](**args)


class _NotProvided:
    """A name the reference imports but the model's forward never uses; using it is an error."""

    def __init__(self, name: str):
        self._name = name

    def __call__(self, *args, **kwargs):
        raise NotImplementedError(f"{self._name} is a stand-in in jobs.parity and is not used by the model's "
                                  "forward pass")

    def __getattr__(self, attr):
        if attr.startswith("__"):
            raise AttributeError(attr)
        return _NotProvided(f"{self._name}.{attr}")


class _Unbuilt(BaseModule):
    """Base classes the reference subclasses for models it does not build here (DETR-style layers)."""

    def __init__(self, *args, **kwargs):
        raise NotImplementedError(f"{type(self).__name__}: built on an mmcv class that the parity check "
                                  "does not provide")


class BaseTransformerLayer(_Unbuilt):
    pass


class TransformerLayerSequence(_Unbuilt):
    pass


@dataclass
class SharedCLIP:
    """The CLIP the ``clip`` stand-in hands to the reference: our seeded random open_clip ViT-B-32."""

    model: nn.Module | None = None

    def get(self) -> nn.Module:
        if self.model is None:
            from capenext.models.clip import build_clip

            self.model = build_clip("ViT-B-32", "random", quick_gelu=True).float().eval()
        return self.model


def _clip_module(shared: SharedCLIP) -> dict[str, Any]:
    import open_clip

    def load(name, device="cpu", jit=False, download_root=None):
        if name not in ("ViT-B/32", "ViT-B-32"):
            raise UsageError(f"the reference asks clip.load({name!r}); the parity check provides ViT-B/32 only")
        return shared.get(), None

    def tokenize(texts, context_length: int = 77, truncate: bool = False):
        return open_clip.tokenize(texts, context_length=context_length)

    return {"load": load, "tokenize": tokenize, "available_models": lambda: ["ViT-B/32"]}


def stub_tree(shared: SharedCLIP | None = None) -> dict[str, dict[str, Any]]:
    """Module name → attributes of every stand-in module (parents are created as packages)."""
    shared = shared or SharedCLIP()
    positional = Registry("position encoding")
    backbones, heads, posenets = Registry("backbone"), Registry("head"), Registry("posenet")
    builder = {
        "BACKBONES": backbones, "HEADS": heads, "POSENETS": posenets, "NECKS": Registry("neck"),
        "LOSSES": Registry("loss"), "MODELS": Registry("model"),
        "build_backbone": backbones.build, "build_head": heads.build, "build_posenet": posenets.build,
        "build_neck": _NotProvided("mmpose.models.builder.build_neck"),
        "build_loss": _NotProvided("mmpose.models.builder.build_loss"),
    }
    layer, sequence = Registry("transformerLayer"), Registry("transformer-layers sequence")
    attention, ffn = Registry("attention"), Registry("feed-forward Network")
    return {
        "mmcv": {"__version__": "stand-in (jobs.parity)"},
        "mmcv.cnn": {"Conv2d": Conv2d, "Linear": Linear, "xavier_init": xavier_init,
                     "build_norm_layer": build_norm_layer, "build_activation_layer": build_activation_layer},
        "mmcv.cnn.bricks": {},
        "mmcv.cnn.bricks.registry": {"TRANSFORMER_LAYER": layer, "TRANSFORMER_LAYER_SEQUENCE": sequence,
                                     "POSITIONAL_ENCODING": positional, "ATTENTION": attention,
                                     "FEEDFORWARD_NETWORK": ffn},
        "mmcv.cnn.bricks.transformer": {
            "POSITIONAL_ENCODING": positional, "build_positional_encoding": positional.build,
            "BaseTransformerLayer": BaseTransformerLayer, "TransformerLayerSequence": TransformerLayerSequence,
            "build_transformer_layer_sequence": sequence.build},
        "mmcv.runner": {"BaseModule": BaseModule},
        "mmcv.runner.base_module": {"BaseModule": BaseModule},
        "mmcv.utils": {"Registry": Registry, "build_from_cfg": build_from_cfg},
        "mmpose": {"__version__": "stand-in (jobs.parity)"},
        "mmpose.core": {},
        "mmpose.core.evaluation": {"keypoint_pck_accuracy": _NotProvided("keypoint_pck_accuracy")},
        "mmpose.core.post_processing": {"transform_preds": _NotProvided("transform_preds")},
        "mmpose.models": {**builder},
        "mmpose.models.builder": builder,
        "mmpose.models.backbones": {},
        "mmpose.models.backbones.hrnet": {"HRNet": _NotProvided("mmpose.models.backbones.hrnet.HRNet")},
        "mmpose.models.detectors": {},
        "mmpose.models.detectors.base": {"BasePose": BasePose},
        "mmpose.models.utils": {},
        "mmpose.models.utils.ops": {"resize": _NotProvided("mmpose.models.utils.ops.resize")},
        "clip": _clip_module(shared),
        "transformers": {n: _NotProvided(f"transformers.{n}") for n in
                         ("AutoModel", "AutoTokenizer", "BertModel", "BertTokenizer", "BertTokenizerFast")},
    }


def _make_modules(tree: dict[str, dict[str, Any]]) -> dict[str, types.ModuleType]:
    mods: dict[str, types.ModuleType] = {}
    names = set(tree)
    for name in list(tree):  # every parent of a stand-in is a stand-in package
        parts = name.split(".")
        names.update(".".join(parts[:i]) for i in range(1, len(parts)))
    for name in sorted(names, key=lambda n: n.count(".")):
        mod = types.ModuleType(name, "stand-in module installed by jobs.parity for the parity check only")
        mod.__path__ = []  # a package: submodules that are not stand-ins fail to import, naming themselves
        mod.__dict__.update(tree.get(name, {}))
        mods[name] = mod
        parent, _, leaf = name.rpartition(".")
        if parent:
            setattr(mods[parent], leaf, mod)
    builder = mods.get("mmpose.models.builder")
    if builder is not None and "mmpose.models" in mods:
        mods["mmpose.models"].builder = builder
    return mods


def _owned(name: str, roots: tuple[str, ...]) -> bool:
    return name.split(".", 1)[0] in roots


@contextlib.contextmanager
def stubbed_imports(reference: Path, shared: SharedCLIP | None = None,
                    bare_packages: dict[str, dict[str, Any]] | None = None) -> Iterator[dict[str, types.ModuleType]]:
    """While active: the stand-ins in ``sys.modules``, ``reference`` first on ``sys.path``, and
    ``bare_packages`` (dotted name → extra attributes) opened as packages on their folders under
    ``reference`` without running their ``__init__``. On exit ``sys.modules`` and ``sys.path`` are as
    before: no stand-in and no module of the checkout stays behind."""
    roots = STUB_ROOTS + REFERENCE_ROOTS
    saved = {n: m for n, m in sys.modules.items() if _owned(n, roots)}
    saved_path = list(sys.path)
    for n in saved:
        del sys.modules[n]
    mods = _make_modules(stub_tree(shared))
    sys.modules.update(mods)
    sys.path.insert(0, str(reference))
    for name, attrs in (bare_packages or {}).items():
        pkg = types.ModuleType(name)
        pkg.__path__ = [str(reference.joinpath(*name.split(".")))]
        pkg.__dict__.update(attrs)
        sys.modules[name] = pkg
        parent, _, leaf = name.rpartition(".")
        if parent in sys.modules:
            setattr(sys.modules[parent], leaf, pkg)
    importlib.invalidate_caches()
    try:
        yield mods
    finally:
        for n in [n for n in sys.modules if _owned(n, roots)]:
            del sys.modules[n]
        sys.modules.update(saved)
        sys.path[:] = saved_path


# ----------------------------------------------------------------------------------------------------
# the reference model


def check_reference(reference: Path, config: str) -> None:
    """One-line errors for a missing folder or one that is not a CapeNext checkout."""
    if not reference.is_dir():
        raise UsageError(f"--reference {reference}: no such directory (a checkout of yzrs/CapeNext)")
    missing = [f for f in REQUIRED_FILES + (config,) if not (reference / f).is_file()]
    if missing:
        raise UsageError(f"--reference {reference}: not a CapeNext checkout (no {missing[0]})")


REFERENCE_BARE = {
    "models": {},
    "models.models": {},
    # backbones/__init__ imports the HRNet and ViT wrappers, which the Swin V2-T model never uses
    "models.models.backbones": {"get_hrnet_w32": _NotProvided("get_hrnet_w32"),
                                "get_vit_backbone": _NotProvided("get_vit_backbone")},
    # detectors/__init__ also imports a CapeXImgModel that capex.py does not define
    "models.models.detectors": {},
}


def import_reference(reference: Path) -> dict[str, types.ModuleType]:
    """Import the reference's model files (inside :func:`stubbed_imports`); a failed import is one line."""
    out = {}
    for name in REFERENCE_MODULES:
        try:
            with warnings.catch_warnings():  # deprecation notices of timm.models.layers and the like
                warnings.simplefilter("ignore", FutureWarning)
                out[name] = importlib.import_module(name)
        except ImportError as err:
            what = getattr(err, "name", None) or str(err)
            raise UsageError(f"--reference {reference}: {name.replace('.', '/')} imports {what!r}, which the parity "
                             f"check's mmcv/mmpose stand-ins do not provide ({type(err).__name__}: {err})") from None
    return out


def reference_config(reference: Path, config: str) -> dict[str, Any]:
    """The model config of ``config`` with CapeNext's fusion module and random (not pretrained) weights."""
    try:
        ns = runpy.run_path(str(reference / config))
    except ImportError as err:
        raise UsageError(f"--reference {reference}: {config} imports {getattr(err, 'name', None) or err!r}, "
                         "which cannot be loaded") from None
    if "model" not in ns or "additional_module_cfg" not in ns:
        raise UsageError(f"--reference {reference}: {config} defines no 'model' / 'additional_module_cfg' "
                         f"(from {INFO_CONFIG}): not a CapeNext config")
    model = dict(ns["model"])
    fusion = dict(ns["additional_module_cfg"])
    if FUSION_MODULE not in fusion.get("available_module_args", {}):
        raise UsageError(f"--reference {reference}: {INFO_CONFIG} has no {FUSION_MODULE} in available_module_args")
    fusion["module_name"] = FUSION_MODULE  # what train.py/test.py pass as cfg.model.additional_module_cfg
    model["additional_module_cfg"] = fusion
    # 'swin' selects the Swin backbone; without '.pth' no pretrained file is read (random init)
    model["pretrained"] = "swin-random-init"
    return model


@torch.no_grad()
def rerandomise_constants(model: nn.Module, generator: torch.Generator, skip: tuple[str, ...] = ("text_backbone.",),
                          scale: float = 0.1) -> list[str]:
    """Add ``scale`` x N(0, 1) noise to every parameter whose elements are all equal (constant inits)."""
    changed = []
    for name, p in model.named_parameters():
        if name.startswith(skip) or p.numel() == 0:
            continue
        flat = p.detach().flatten()
        if bool((flat == flat[0]).all()):
            p.add_(scale * torch.randn(p.shape, generator=generator, dtype=p.dtype))
            changed.append(name)
    return changed


@contextlib.contextmanager
def _cpu_only() -> Iterator[None]:
    """The reference moves its CLIP to CUDA when one is present; the check runs on CPU."""
    original = torch.cuda.is_available
    torch.cuda.is_available = lambda: False
    try:
        yield
    finally:
        torch.cuda.is_available = original


def build_reference(reference: Path, config: str, seed: int, shared: SharedCLIP) -> tuple[nn.Module, list[str]]:
    """The reference CapeXModel at seeded random weights (call inside :func:`stubbed_imports`)."""
    mods = import_reference(reference)
    cfg = reference_config(reference, config)
    posenets = sys.modules["mmpose.models.builder"].POSENETS
    if "CapeXModel" not in posenets:
        raise UsageError(f"--reference {reference}: models/models/detectors/capex.py registers no CapeXModel")
    shared.get()  # the seeded random CLIP first, outside the model's RNG stream
    with torch.random.fork_rng(devices=[]), _cpu_only(), contextlib.redirect_stdout(sys.stderr):
        torch.manual_seed(seed)
        model = posenets.build(cfg)
    changed = rerandomise_constants(model, torch.Generator().manual_seed(seed + 1))
    del mods
    return model.eval(), changed


def save_official(model: nn.Module, path: Path, config_text: str) -> None:
    """The reference model as mmcv's ``save_checkpoint`` writes it: ``{"meta", "state_dict"}`` on CPU."""
    state = OrderedDict((k, v.detach().cpu().clone()) for k, v in model.state_dict().items())
    meta = {"mmcv_version": "stand-in (jobs.parity)", "mmpose_version": "stand-in (jobs.parity)", "epoch": 0,
            "iter": 0, "config": config_text}
    torch.save({"meta": meta, "state_dict": state}, path)


# ----------------------------------------------------------------------------------------------------
# inputs, captures and the comparison


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


# ----------------------------------------------------------------------------------------------------
# the command


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m jobs.parity",
        description="Compare our model with the reference implementation, stage by stage, on the same random "
                    "weights (the reference's own code, read from your checkout; no mmcv or mmpose needed).",
        epilog="example:\n  python -m jobs.parity --reference /path/to/CapeNext\n"
               "  python -m jobs.parity --reference /path/to/CapeNext --perturb   # negative control: must fail",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reference", type=Path, required=True, help="a checkout of yzrs/CapeNext")
    p.add_argument("--config", default=DEFAULT_CONFIG, help=f"the reference config, relative to it ({DEFAULT_CONFIG})")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights and inputs (0)")
    p.add_argument("--atol", type=float, default=1e-5, help="absolute tolerance per stage (1e-5)")
    p.add_argument("--rtol", type=float, default=1e-4,
                   help="tolerance relative to the stage's largest reference value (1e-4)")
    p.add_argument("--perturb", nargs="?", const=DEFAULT_PERTURB, default=None, metavar="KEY",
                   help=f"negative control: add noise to our parameter KEY after conversion "
                        f"(default {DEFAULT_PERTURB}); the check must fail at the stage it feeds")
    p.add_argument("--workdir", type=Path, default=None,
                   help="where the official-format and converted checkpoints go (default: a temporary folder)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    reference = args.reference
    check_reference(reference, args.config)
    torch.set_grad_enabled(False)
    from capenext.checkpoint import load_model
    from jobs.convert import main as convert_main

    shared = SharedCLIP()
    with contextlib.ExitStack() as stack:
        work = args.workdir or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="parity-")))
        work.mkdir(parents=True, exist_ok=True)
        official, ours_path = work / "reference_random.pth", work / "converted.pt"
        with stubbed_imports(reference, shared, REFERENCE_BARE):
            print(f"building the reference model from {args.config} ({FUSION_MODULE}) at seed {args.seed} ...",
                  flush=True)
            ref, changed = build_reference(reference, args.config, args.seed, shared)
            print(f"re-randomised {len(changed)} constant-initialised tensors (biases, norms, offset heads' last "
                  "layers, Swin V2 post-norms, q/v biases, logit scales)", flush=True)
            print("CLIP: both sides use the same random CLIP (open_clip ViT-B-32, QuickGELU, seeded) in place of "
                  "OpenAI's clip.load weights; the CLIP rows check the plumbing around it", flush=True)
            save_official(ref, official, (reference / args.config).read_text())
            print(f"converting {official.name} with jobs.convert ...", flush=True)
            with contextlib.redirect_stdout(sys.stderr):
                convert_main(["--official", str(official), "--kind", "capenext", "--out", str(ours_path)])
            model, _, _ = load_model(ours_path)
            model.eval()
            if args.perturb:
                perturb(model, args.perturb)
                print(f"negative control: perturbed {args.perturb} (noise of 0.5 x its std); expected first failure: "
                      f"{expected_stage(args.perturb) or 'unknown'}", flush=True)
            inputs = make_inputs(args.seed)
            print(f"inputs: 2 categories ({', '.join(inputs.categories)}), "
                  f"{sum(map(sum, inputs.visible))} of {sum(map(len, inputs.visible))} keypoints visible in "
                  f"the supports, crop {inputs.img.shape[-1]}", flush=True)
            with contextlib.redirect_stdout(sys.stderr):  # the reference prints from its forward pass
                ref_values = run_reference(ref, inputs)
        ours_values = run_ours(model, inputs)
    report = compare(ref_values, ours_values, inputs.kp_mask, args.atol, args.rtol)
    print(report.table())
    if report.ok:
        print(f"parity: every stage within atol {args.atol:g} + rtol {args.rtol:g} x max|ref|")
        return 0
    print(f"parity: FAILED, first at {report.first_failure}")
    if args.perturb:
        expected = expected_stage(args.perturb)
        verdict = "as expected" if report.first_failure == expected else f"expected at {expected or 'unknown'}"
        print(f"negative control ({args.perturb}): failed at {report.first_failure}, {verdict}")
    return 1


if __name__ == "__main__":
    run_main(main)
