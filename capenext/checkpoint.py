"""Checkpoints: a state_dict plus the config, loadable with ``weights_only=True``.

A checkpoint file holds ``{"format": "capenext/1", "config": <RunCfg as dict>, "model": state_dict,
"meta": {...}}``. The frozen CLIP is left out (deviation, named: the reference's checkpoints carry it):
it is rebuilt from ``config.model.clip_checkpoint`` (a local file, or the seeded ``random`` init), which
keeps a ViT-B-32 run's checkpoints 600 MB smaller. Training state (optimizer, epoch, step, RNG, MLflow
run id) lives in a second file beside it, ``state.pt``, also plain tensors and containers.

A training run's folder, ``<storage>/<run name>/`` (:func:`run_dir`), is also defined here::

    checkpoint_*/model.pt      Ray Train's checkpoints (local mode: local/checkpoint_*/); weights + config
    checkpoint_*/state.pt      optimiser, RNG, epoch, step, best val PCK, MLflow run id
    checkpoint_*/progress.json epoch, step, best, run id and every file's size, written last
    artifacts/final.pt         the finished run's weights (also logged to MLflow as checkpoints/final.pt)
    artifacts/best.pt          the weights of the best val PCK@0.2 epoch

A checkpoint folder is complete when its ``progress.json`` is there and every file it lists has the size
written (:func:`incomplete`); a run resumes from its newest complete folder (:func:`latest_checkpoint`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from capenext.cli import UsageError
from capenext.config import RunCfg, from_dict, to_dict
from capenext.files import not_a_checkpoint

FORMAT = "capenext/1"
FROZEN_PREFIX = "clip."
CHECKPOINT_FILE = "model.pt"
STATE_FILE = "state.pt"
PROGRESS_FILE = "progress.json"


def trainable_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's state_dict without the frozen CLIP."""
    model = getattr(model, "module", model)  # unwrap DDP
    return {k: v.detach().cpu() for k, v in model.state_dict().items() if not k.startswith(FROZEN_PREFIX)}


def _replace_durably(tmp: Path, path: Path) -> None:
    """Flush ``tmp`` to disk, rename it over ``path`` and flush the folder: after a crash the reader sees
    the old file or the whole new one, never a name pointing at unwritten bytes."""
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    try:
        fd = os.open(path.parent, os.O_RDONLY)
    except OSError:  # a folder that cannot be opened for reading (some network file systems)
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_atomically(path: str | Path, write: Callable[[Path], None]) -> None:
    """``write`` a temporary file beside ``path``, then rename it over ``path`` durably
    (:func:`_replace_durably`); a failed write leaves the old file and no temporary."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        write(tmp)
        _replace_durably(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_save(obj: Any, path: str | Path) -> None:
    """``torch.save`` whole or not at all (:func:`_write_atomically`)."""
    _write_atomically(path, lambda tmp: torch.save(obj, tmp))


def atomic_copy(src: str | Path, path: str | Path) -> None:
    """Copy ``src`` to ``path`` whole or not at all: a reader of ``best.pt`` never sees half a file."""
    import shutil

    _write_atomically(path, lambda tmp: shutil.copyfile(src, tmp))


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


def load_weights(model: nn.Module, state: dict[str, torch.Tensor], where: str) -> None:
    """Strict load of everything but the frozen CLIP; one line naming the first problems."""
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


# --- a training run's folder ---------------------------------------------------------------------------


def run_dir(storage: str | Path, run_name: str) -> Path:
    """``<storage>/<run name>``: where a training run keeps its checkpoints and artifacts."""
    return Path(storage) / run_name


def artifacts_dir(storage: str | Path, run_name: str) -> Path:
    """``<storage>/<run name>/artifacts``: the run's ``final.pt`` and ``best.pt``."""
    return run_dir(storage, run_name) / "artifacts"


def write_progress(folder: Path, progress: dict[str, Any]) -> None:
    """Write a checkpoint folder's progress last, with the size of every file in it: a folder whose copy
    was cut short (a worker killed while Ray uploads it) does not match and is not resumed from."""
    files = {p.name: p.stat().st_size for p in sorted(folder.iterdir()) if p.is_file() and p.name != PROGRESS_FILE}
    (folder / PROGRESS_FILE).write_text(json.dumps({**progress, "files": files}))


def incomplete(folder: Path) -> str | None:
    """What is missing from a checkpoint folder (``None`` when whole): its ``progress.json`` (written last,
    so a copy cut off before it arrived has none), or a file it lists that is absent or of another size
    than written. Ray copies a folder's files in no fixed order."""
    try:
        files = json.loads((folder / PROGRESS_FILE).read_text())["files"]
    except FileNotFoundError:
        return f"{PROGRESS_FILE} is missing"
    except (OSError, ValueError, KeyError, TypeError):
        return f"{PROGRESS_FILE} is cut short"
    for name, size in files.items():
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != size:
            return f"{name} is {path.stat().st_size} bytes of the {size} written"
    return None


def complete(folder: Path) -> bool:
    """Whether a checkpoint folder holds every file it was written with (see :func:`incomplete`)."""
    return incomplete(folder) is None


def read_progress(folder: Path) -> dict[str, Any]:
    """A checkpoint folder's epoch, step, best val PCK and run id, without loading its optimiser state."""
    return json.loads((folder / PROGRESS_FILE).read_text())


def checkpoints(storage: Path, run_name: str) -> list[Path]:
    """Every checkpoint folder of a run (one with a training state), Ray's and local mode's."""
    base = run_dir(storage, run_name)
    found = [p.parent for p in base.glob("checkpoint_*/" + STATE_FILE)]
    return found + [p.parent for p in (base / "local").glob("checkpoint_*/" + STATE_FILE)]


def latest_checkpoint(storage: Path, run_name: str, complete_only: bool = False) -> Path | None:
    """The newest complete checkpoint folder of a run (highest step), or ``None``. A folder cut short
    (see :func:`incomplete`) is passed over: a worker killed while Ray copied it, and the restarted worker
    went on from the one before. Without ``complete_only``, a folder cut short that is not older (by time)
    than every complete one is returned as it is, for the driver to refuse in one line (:func:`check_resumable`)."""
    found = checkpoints(storage, run_name)
    whole = [p for p in found if complete(p)]
    newest = max(whole, key=lambda p: read_progress(p)["step"], default=None)
    if complete_only:
        return newest
    since = newest.stat().st_mtime if newest is not None else float("-inf")
    torn = [p for p in found if p not in whole and p.stat().st_mtime >= since]
    return max(torn, key=lambda p: p.stat().st_mtime) if torn else newest


def check_resumable(folder: Path) -> None:
    """Refuse, in one line, to resume from a checkpoint folder that is cut short."""
    missing = incomplete(folder)
    if missing:
        raise UsageError(f"the newest checkpoint {folder} is cut short ({missing}): remove that folder to "
                         "resume from the one before, or pick another --run-name")


def resumable_checkpoint(storage: Path, run_name: str) -> Path | None:
    """The folder a re-run resumes from (:func:`latest_checkpoint`), refused in one line if cut short."""
    latest = latest_checkpoint(storage, run_name)
    if latest is not None:
        check_resumable(latest)
    return latest
