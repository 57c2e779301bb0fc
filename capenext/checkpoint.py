"""Checkpoints: a state_dict plus the config, loadable with ``weights_only=True``.

A checkpoint file holds ``{"format": "capenext/1", "config": <RunCfg as dict>, "model": state_dict,
"meta": {...}}``. The frozen CLIP is left out (deviation, named: the reference's checkpoints carry it):
it is rebuilt from ``config.model.clip_checkpoint`` (a local file, or the seeded ``random`` init), which
keeps a ViT-B-32 run's checkpoints 600 MB smaller. Training state (optimizer, epoch, step, RNG, MLflow
run id) lives in a second file beside it, ``state.pt``, also plain tensors and containers.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from capenext.config import RunCfg, from_dict, to_dict

FORMAT = "capenext/1"
FROZEN_PREFIX = "clip."


def trainable_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's state_dict without the frozen CLIP."""
    model = getattr(model, "module", model)  # unwrap DDP
    return {k: v.detach().cpu() for k, v in model.state_dict().items() if not k.startswith(FROZEN_PREFIX)}


def atomic_save(obj: Any, path: str | Path) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def not_a_checkpoint(path: str | Path) -> str:
    """What an unreadable file is not, from its first bytes: torch's zip format, a legacy pickle, or neither."""
    import zipfile

    path = Path(path)
    with open(path, "rb") as f:
        head = f.read(4)
    if zipfile.is_zipfile(path):
        return "not a PyTorch checkpoint (a zip archive without torch's data.pkl)"
    if head == b"PK\x03\x04":
        return "not a whole PyTorch checkpoint (a torn zip archive: truncated, its directory missing)"
    if head[:1] == b"\x80":
        return "not a PyTorch checkpoint torch can read (a pickle, truncated or of another program)"
    if not head:
        return "not a PyTorch checkpoint (an empty file)"
    return "not a PyTorch checkpoint (neither torch's zip format nor a pickle)"


def save_checkpoint(path: str | Path, model: nn.Module, cfg: RunCfg, meta: dict[str, Any] | None = None) -> None:
    atomic_save({"format": FORMAT, "config": to_dict(cfg), "model": trainable_state_dict(model),
                 "meta": dict(meta or {})}, path)


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load and check the container; one-line errors for a missing, corrupt or foreign file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for truncated or foreign pickles
        raise ValueError(f"{path}: {not_a_checkpoint(path)}; torch.load said {type(err).__name__}: "
                         f"{' '.join(str(err).split())[:160]}") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise ValueError(f"{path}: not a capenext checkpoint (expected format {FORMAT!r}; convert official "
                         "weights with python -m jobs.convert)")
    try:
        ckpt["run_config"] = from_dict(ckpt["config"])
    except (KeyError, TypeError) as err:
        raise ValueError(f"{path}: checkpoint of an unknown config ({err})") from None
    return ckpt


def config_differences(a: dict[str, Any], b: dict[str, Any], prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two nested config dicts."""
    out = []
    for key in sorted(set(a) | set(b)):
        va, vb = a.get(key), b.get(key)
        if isinstance(va, dict) and isinstance(vb, dict):
            out += config_differences(va, vb, f"{prefix}{key}.")
        elif (list(va) if isinstance(va, (list, tuple)) else va) != (list(vb) if isinstance(vb, (list, tuple)) else vb):
            out.append(f"{prefix}{key}")
    return out


# state-dict keys renamed since checkpoints were first written: old prefix → new prefix
LEGACY_PREFIXES = {"dsfr.proj.": "projection.proj."}  # no_dsfr's projections were held under "dsfr"


def _renamed(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in state.items():
        for old, new in LEGACY_PREFIXES.items():
            if key.startswith(old):
                key = new + key[len(old):]
        out[key] = value
    return out


def load_weights(model: nn.Module, state: dict[str, torch.Tensor], where: str) -> None:
    """Strict load of everything but the frozen CLIP; one line naming the first problems."""
    state = _renamed(state)
    target = getattr(model, "module", model)
    result = target.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if not k.startswith(FROZEN_PREFIX)]
    if missing or result.unexpected_keys:
        raise ValueError(f"{where}: weights do not fit the model (missing {missing[:3]}, unexpected "
                         f"{result.unexpected_keys[:3]}; {len(missing)} + {len(result.unexpected_keys)} keys)")


def load_model(path: str | Path, clip_checkpoint: str | None = None, device: str | torch.device = "cpu"):
    """``(model, RunCfg, meta)`` from a checkpoint file, in eval mode. ``clip_checkpoint`` overrides the
    config's CLIP weights path (e.g. the file sits elsewhere on this machine)."""
    from capenext.models import build_model

    ckpt = read_checkpoint(path)
    cfg: RunCfg = ckpt["run_config"]
    if clip_checkpoint is not None:
        cfg.model.clip_checkpoint = clip_checkpoint
    cfg.model.backbone_checkpoint = None  # the checkpoint carries the trained backbone
    model = build_model(cfg.model)
    load_weights(model, ckpt["model"], str(path))
    return model.to(device).eval(), cfg, ckpt.get("meta", {})
