"""The reference model (yzrs/CapeNext's ``CapeXModel``) built from a checkout at seeded random weights, and
written as an mmcv checkpoint: what ``jobs.parity`` compares with and ``jobs.conversion.fixture`` records.

Call :func:`build_reference` inside :func:`jobs.conversion.stubs.stubbed_imports`: the reference's model
files are imported one by one (their packages opened bare, see :data:`REFERENCE_BARE`) with the mmcv/mmpose
stand-ins in ``sys.modules``; every computation that runs is the reference's own code.
"""

from __future__ import annotations

import contextlib
import importlib
import runpy
import sys
import types
import warnings
from collections import OrderedDict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from capenext.cli import UsageError
from jobs.conversion.stubs import NotProvided, SharedCLIP

__all__ = [
    "DEFAULT_CONFIG", "FUSION_MODULE", "INFO_CONFIG", "REFERENCE_BARE", "REFERENCE_MODULES", "REQUIRED_FILES",
    "build_reference", "check_reference", "import_reference", "reference_config", "rerandomise_constants",
    "save_official",
]

DEFAULT_CONFIG = "configs/clip/clip_split1_config.py"
INFO_CONFIG = "configs/info.py"
FUSION_MODULE = "SimpleMultiModalModule"  # the published CapeNext setting
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
    "models.models.backbones": {"get_hrnet_w32": NotProvided("get_hrnet_w32"),
                                "get_vit_backbone": NotProvided("get_vit_backbone")},
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


def build_reference(reference: Path, config: str, seed: int, shared: SharedCLIP,
                    adjust: Callable[[dict[str, Any]], dict[str, Any]] | None = None) -> tuple[nn.Module, list[str]]:
    """The reference CapeXModel at seeded random weights (call inside :func:`stubbed_imports`); ``adjust``
    changes the model config first (``jobs.conversion.fixture``: reduced sizes)."""
    mods = import_reference(reference)
    cfg = reference_config(reference, config)
    if adjust is not None:
        cfg = adjust(cfg)
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


def save_official(model: nn.Module, path: Path, config_text: str, dtypes: dict[str, torch.dtype] | None = None,
                  version: str = "stand-in (jobs.parity)") -> None:
    """The reference model as mmcv's ``save_checkpoint`` writes it: ``{"meta", "state_dict"}`` on CPU, each
    tensor in its own dtype or the one ``dtypes`` names for its key; ``version`` stands for mmcv's and mmpose's."""
    dtypes = dtypes or {}
    state = OrderedDict((k, v.detach().cpu().to(dtypes.get(k, v.dtype)).clone())
                        for k, v in model.state_dict().items())
    meta = {"mmcv_version": version, "mmpose_version": version, "epoch": 0, "iter": 0, "config": config_text}
    torch.save({"meta": meta, "state_dict": state}, path)

