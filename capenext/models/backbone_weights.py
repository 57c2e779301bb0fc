"""HRNet-W32's ImageNet weights as the reference loads them, strictly, into our timm trunk.

The reference (yzrs/CapeNext ``models/models/detectors/capex.py::init_backbone``) builds mmpose 0.29's
``HRNet`` (``models/models/backbones/hrnet.py::get_hrnet_w32``) and calls
``init_weights('pretrained/hrnet_w32-36af842e.pth')``: mmpose's ``load_checkpoint(strict=False)`` takes
``state_dict`` out of an mmcv checkpoint (or the bare dict), strips ``module.backbone.``, ``module.`` or
``backbone.`` and leaves what does not match unused, in a log line. That file is the ImageNet HRNet-W32 of
the HRNet pose code (deep-high-resolution-net.pytorch, ``models/pytorch/imagenet/``), also served at
download.openmmlab.com/mmpose/pretrain_models/: a bare state dict in HRNet's own names.

Names (file → ours). mmpose's HRNet, timm's ``hrnet_w32`` and the file follow the one module tree of the
HRNet code (timm's was ported from it), so a trunk tensor keeps its name:

* stem: ``conv1``, ``bn1``, ``conv2``, ``bn2``;
* ``layer1.{k}``: Bottleneck ``conv1/bn1`` (1x1), ``conv2/bn2`` (3x3), ``conv3/bn3`` (1x1), block 0 with
  ``downsample.0`` (1x1 conv) and ``downsample.1`` (BN);
* ``transition{n}.{i}.{0,1}``: conv3x3 + BN of a branch whose width changes; ``transition{n}.{i}.0.{0,1}``:
  conv3x3/2 + BN making a new, lower-resolution branch;
* ``stage{n}.{m}.branches.{b}.{k}``: BasicBlock ``conv1/bn1``, ``conv2/bn2``;
* ``stage{n}.{m}.fuse_layers.{i}.{j}.{0,1}`` (j > i: 1x1 conv + BN, then upsample) and
  ``...fuse_layers.{i}.{j}.{k}.{0,1}`` (j < i: the k-th conv3x3/2 + BN).

Left out, and listed (:attr:`LoadedWeights.dropped`): the ImageNet classification head, whose top-level
modules are ``head`` (this file's name for it, as mmpose's load log of it shows) or ``incre_modules``,
``downsamp_modules``, ``final_layer``, ``classifier`` (HRNet-Image-Classification's and timm's names); and
``stage4.{last}.fuse_layers.{1,2,3}``, the lower-resolution outputs of the last module, which the
reference's HRNet never builds (stage 4 ``multiscale_output`` False) and our trunk drops too. A file
without ``num_batches_tracked`` counters is accepted (BatchNorm reads them only with momentum None).
Anything else (a tensor of ours the file lacks, a tensor the file has that fits nowhere, another shape)
stops the load with one line naming the first of each.
"""

from __future__ import annotations

import logging
import pickle
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

__all__ = ["HEAD_MODULES", "LoadedWeights", "load_hrnet_weights", "map_hrnet_state", "read_state_dict"]

_log = logging.getLogger(__name__)

FLAG = "ModelCfg.backbone_checkpoint"  # --backbone-checkpoint
PREFIXES = ("module.backbone.", "module.", "backbone.")  # stripped, as mmpose's load_checkpoint does
TRUNK_MODULES = ("conv1", "bn1", "conv2", "bn2", "layer1", "transition1", "transition2", "transition3",
                 "stage2", "stage3", "stage4")
HEAD_MODULES = ("head", "incre_modules", "downsamp_modules", "final_layer", "classifier")
MARKERS = ("conv1.weight", "layer1.0.conv1.weight", "transition1.0.0.weight",
           "stage2.0.branches.0.0.conv1.weight")  # any one of them: HRNet's layout
OPTIONAL = ".num_batches_tracked"
SHOWN = 3  # problem keys named per kind


@dataclass(frozen=True)
class LoadedWeights:
    """What a strict load did: ``loaded`` tensors copied; ``dropped`` file keys left out (as in the file)."""

    path: str
    loaded: int
    dropped: tuple[str, ...]
    counters_kept: int  # our num_batches_tracked the file had none for

    def summary(self) -> str:
        groups: dict[str, int] = {}
        for key in self.dropped:
            group = _group(_strip(key))
            groups[group] = groups.get(group, 0) + 1
        left = ", ".join(f"{g}.* ({n})" for g, n in groups.items()) or "none"
        kept = f"; {self.counters_kept} num_batches_tracked not in the file (kept at 0)" if self.counters_kept else ""
        return (f"hrnet_w32 weights from {self.path}: {self.loaded} tensors loaded; {len(self.dropped)} left out "
                f"as the reference leaves them (ImageNet head, outputs its HRNet does not build): {left}{kept}")


def _group(key: str) -> str:
    """``head.0``, ``classifier`` or ``stage4.2.fuse_layers.1``: where a dropped tensor sits."""
    parts = key.split(".")
    return ".".join(parts[:4]) if parts[0] in TRUNK_MODULES else ".".join(parts[:2 if parts[0] == "head" else 1])


def _strip(key: str) -> str:
    for prefix in PREFIXES:
        if key.startswith(prefix):
            return key[len(prefix):]
    return key


def _one_line(err: BaseException, limit: int = 160) -> str:
    return f"{type(err).__name__}: {' '.join(str(err).split())[:limit]}"


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a weights file: a bare state dict, an mmcv checkpoint's ``state_dict``, or safetensors.

    Read with ``torch.load(weights_only=True)``; a file that needs other globals (numpy values in an mmcv
    ``meta``) is refused by name, before anything of it is unpickled.
    """
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as err:  # a torn or foreign file
            raise ValueError(f"{FLAG}={str(path)!r}: not a readable safetensors file ({_one_line(err)})") from None
    from capenext.files import not_a_checkpoint

    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        try:  # listed from the zip archive, nothing unpickled
            names = list(torch.serialization.get_unsafe_globals_in_checkpoint(str(path)))
        except Exception:  # not a zip checkpoint
            names = []
        if names:
            more = f" and {len(names) - SHOWN} more" if len(names) > SHOWN else ""
            raise ValueError(f"{FLAG}={str(path)!r}: cannot be read with weights_only=True, it holds "
                             f"{', '.join(names[:SHOWN])}{more}; nothing of it was run: re-save its state_dict as "
                             "plain tensors") from None
        raise ValueError(f"{FLAG}={str(path)!r}: {not_a_checkpoint(path)}; torch.load said {_one_line(err)}") from None
    except Exception as err:  # truncated zips, foreign files: torch raises several types
        raise ValueError(f"{FLAG}={str(path)!r}: {not_a_checkpoint(path)}; torch.load said {_one_line(err)}") from None
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):  # an mmcv checkpoint
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not obj or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()):
        what = f"a dict with keys {list(obj)[:5]}" if isinstance(obj, dict) else type(obj).__name__
        raise ValueError(f"{FLAG}={str(path)!r}: not a state dict of tensors (nor an mmcv checkpoint with one): "
                         f"{what}")
    return dict(obj)


def map_hrnet_state(state: dict[str, torch.Tensor], want: dict[str, torch.Size], source: str
                    ) -> tuple[dict[str, torch.Tensor], list[str]]:
    """``({our name: tensor}, [file keys left out])`` under the rules above; ValueError in one line otherwise.

    ``want`` is our trunk's state dict shapes (after the last module's extra fuse rows were dropped).
    """
    stripped: dict[str, str] = {}  # our name → file key
    unexpected: list[str] = []
    for key in state:
        if _strip(key) in stripped:  # the same tensor twice (``conv1.weight`` and ``module.conv1.weight``)
            unexpected.append(key)
        else:
            stripped[_strip(key)] = key
    if not any(m in stripped for m in MARKERS):
        raise ValueError(f"{FLAG}={source!r}: not HRNet weights (none of {', '.join(MARKERS)}); its first keys: "
                         f"{', '.join(list(state)[:SHOWN])}")
    last = max(int(k.split(".")[1]) for k in want if k.startswith("stage4."))
    unbuilt = re.compile(rf"^stage4\.{last}\.fuse_layers\.[1-9]")
    mapped: dict[str, torch.Tensor] = {}
    dropped: list[str] = []
    shapes: dict[str, str] = {}  # our name → problem
    for name, key in stripped.items():
        tensor = state[key]
        if name.split(".")[0] in HEAD_MODULES or unbuilt.match(name):
            dropped.append(key)
        elif name not in want:
            unexpected.append(key)
        elif tuple(tensor.shape) != tuple(want[name]):
            shapes[name] = f"{key} {tuple(tensor.shape)} (ours {tuple(want[name])})"
        else:
            mapped[name] = tensor
    missing = [k for k in want if k not in mapped and k not in shapes and not k.endswith(OPTIONAL)]
    problems = [f"{len(v)} {what} (first: {', '.join(v[:SHOWN])})" for what, v in
                (("missing", missing), ("unexpected", unexpected), ("of another shape", list(shapes.values()))) if v]
    if problems:
        raise ValueError(f"{FLAG}={source!r}: does not fit hrnet_w32 (HRNet-W32 ImageNet weights in HRNet's names, "
                         f"as mmpose's hrnet_w32-36af842e.pth): {'; '.join(problems)}")
    return mapped, dropped


def load_hrnet_weights(trunk: nn.Module, path: str) -> LoadedWeights:
    """Fill every tensor of ``trunk`` (timm ``hrnet_w32``) from ``path``, strictly; say what was left out."""
    state = read_state_dict(path)
    ours = trunk.state_dict()
    mapped, dropped = map_hrnet_state(state, {k: v.shape for k, v in ours.items()}, path)
    kept = [k for k in ours if k not in mapped]  # num_batches_tracked only (map_hrnet_state checked the rest)
    trunk.load_state_dict({**{k: ours[k] for k in kept}, **mapped}, strict=True)
    report = LoadedWeights(path, len(mapped), tuple(dropped), len(kept))
    _log.warning("note: %s", report.summary())
    return report
