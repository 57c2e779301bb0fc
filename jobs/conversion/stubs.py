"""The stand-ins for the mmcv / mmpose / clip / transformers pieces the reference's model files import, and
:func:`stubbed_imports`, which puts them in ``sys.modules`` only while the parity check (``jobs.parity``) runs."""

from __future__ import annotations

import contextlib
import importlib
import sys
import types
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from capenext.cli import UsageError

# top-level names whose modules are replaced (stand-ins) or loaded from the checkout during the check
STUB_ROOTS = ("mmcv", "mmpose", "clip", "transformers")
REFERENCE_ROOTS = ("models", "configs")


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


class NotProvided:
    """A name the reference imports but the model's forward never uses; using it is an error."""

    def __init__(self, name: str):
        self._name = name

    def __call__(self, *args, **kwargs):
        raise NotImplementedError(f"{self._name} is a stand-in in jobs.parity and is not used by the model's "
                                  "forward pass")

    def __getattr__(self, attr):
        if attr.startswith("__"):
            raise AttributeError(attr)
        return NotProvided(f"{self._name}.{attr}")


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
    """The CLIP the ``clip`` stand-in hands to the reference: our seeded random open_clip ``model_name``
    (ViT-B-32, the reference's architecture; ``jobs.conversion.fixture`` names a reduced one)."""

    model: nn.Module | None = None
    model_name: str = "ViT-B-32"

    def get(self) -> nn.Module:
        if self.model is None:
            from capenext.models.clip import build_clip

            self.model = build_clip(self.model_name, "random", quick_gelu=True).float().eval()
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
        "build_neck": NotProvided("mmpose.models.builder.build_neck"),
        "build_loss": NotProvided("mmpose.models.builder.build_loss"),
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
        "mmpose.core.evaluation": {"keypoint_pck_accuracy": NotProvided("keypoint_pck_accuracy")},
        "mmpose.core.post_processing": {"transform_preds": NotProvided("transform_preds")},
        "mmpose.models": {**builder},
        "mmpose.models.builder": builder,
        "mmpose.models.backbones": {},
        "mmpose.models.backbones.hrnet": {"HRNet": NotProvided("mmpose.models.backbones.hrnet.HRNet")},
        "mmpose.models.detectors": {},
        "mmpose.models.detectors.base": {"BasePose": BasePose},
        "mmpose.models.utils": {},
        "mmpose.models.utils.ops": {"resize": NotProvided("mmpose.models.utils.ops.resize")},
        "clip": _clip_module(shared),
        "transformers": {n: NotProvided(f"transformers.{n}") for n in
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
