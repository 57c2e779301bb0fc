"""A training run as the jobs see it: its command-line options, its config, and its files on disk.

``jobs.train`` parses these options for one run and ``jobs.sweep`` passes them on to each trial; both
resolve the config with :func:`resolve_config`. On disk a run lives in ``<storage>/<run name>/``::

    checkpoint_*/model.pt      Ray Train's checkpoints (local mode: local/checkpoint_*/); weights + config
    checkpoint_*/state.pt      optimiser, RNG, epoch, step, best val PCK, MLflow run id
    checkpoint_*/progress.json epoch, step, best, run id: what resuming needs, readable without torch
    artifacts/final.pt         the finished run's weights (also logged to MLflow as checkpoints/final.pt)
    artifacts/best.pt          the weights of the best val PCK@0.2 epoch
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from capenext.cli import UsageError
from capenext.config import RunCfg, available_presets, resolve

DEFAULT_STORAGE = "runs"
CHECKPOINT_FILE = "model.pt"
STATE_FILE = "state.pt"
PROGRESS_FILE = "progress.json"
FREEZE_CHOICES = ("backbone", "backbone,encoder")  # --freeze: model parts (attributes) kept fixed


# --- command line -----------------------------------------------------------------------------------


def add_config_arguments(g) -> None:
    """``--config`` and ``--set``: the preset and overrides of a run (also taken by ``pipelines.embed``)."""
    g.add_argument("--config", default=None,
                   help=f"config preset (default: 'tiny' for the tiny backbone, else 'swinv2_t'); one of "
                        f"{available_presets()}")
    g.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override any config field, e.g. --set optim.lr=2e-5 (repeatable)")


def add_text_arguments(g) -> None:
    """``--descriptions`` and ``--text-variant``: where the keypoint texts come from (also ``pipelines.embed``)."""
    g.add_argument("--descriptions", default=None,
                   help="keypoint texts from a descriptions file (python -m pipelines.descriptions, or a CapeX-style "
                        "name → texts json) instead of the annotations' names")
    g.add_argument("--text-variant", default=None,
                   help="which of the reference's texts the descriptions file gives (default regular)")


def add_training_arguments(p: argparse.ArgumentParser, sweep: bool = False) -> None:
    """The options of one run; the sweep passes them on to each trial."""
    g = p.add_argument_group("data")
    g.add_argument("--shards", type=Path, required=True, help="shard folder (pipelines.shard)")
    g.add_argument("--embeddings", type=Path, required=True, help="embedding folder (pipelines.embed)")
    add_text_arguments(g)
    g = p.add_argument_group("model and schedule")
    add_config_arguments(g)
    if not sweep:
        g.add_argument("--backbone", default=None, help="registered backbone (default: the preset's)")
    g.add_argument("--clip-model", default=None, help="open_clip model name or 'tiny' (default: the preset's)")
    g.add_argument("--clip-checkpoint", default=None, help="local CLIP weights, or 'random'")
    g.add_argument("--backbone-checkpoint", default=None, help="local pretrained backbone weights")
    g.add_argument("--image-embedding", choices=("precomputed", "online"), default=None,
                   help="CLIP image embedding from the embedding tables, or inside the forward (reference)")
    g.add_argument("--epochs", type=int, default=None, help="epochs (default: the preset's, 200)")
    g.add_argument("--batch-size", type=int, default=None, help="global batch (default: the preset's, 32)")
    g.add_argument("--seed", type=int, default=None, help="seed of init, pairs and augmentation (default 0)")
    g.add_argument("--max-steps", type=int, default=None, help="cap the optimizer steps per epoch (tests)")
    g = p.add_argument_group("fine-tuning")
    g.add_argument("--init-checkpoint", default=None, metavar="CHECKPOINT",
                   help="start from these weights (a file, runs:/<run_id>/..., a run id, models:/NAME@ALIAS, a "
                        "jobs.convert output): model state only, fresh optimiser and schedule; ignored when the "
                        "run resumes from a checkpoint of its own")
    g.add_argument("--freeze", default=None, metavar="PARTS",
                   help=f"keep these parts' weights fixed (few-shot fine-tuning): {' or '.join(FREEZE_CHOICES)}")
    g = p.add_argument_group("evaluation")
    g.add_argument("--val-every", type=int, default=1, help="validate every N epochs (default 1)")
    g.add_argument("--val-episodes", type=int, default=None, help="val episodes per category (default 100)")
    g.add_argument("--test-episodes", type=int, default=None, help="test episodes per category (default 200)")
    g.add_argument("--test-queries", type=int, default=None, help="queries per episode (default 15)")
    g.add_argument("--episodes", choices=("ours", "reference"), default=None,
                   help="test episodes: ours (default, seeded) or the reference's (mmpose's sampler; taken by "
                        "python -m jobs.evaluate --episodes reference --data-root ROOT)")
    g = p.add_argument_group("execution")
    g.add_argument("--num-workers", type=int, default=1, help="Ray Train DDP workers (default 1)")
    g.add_argument("--cpus-per-worker", type=float, default=1, help="CPUs each worker holds (default 1)")
    g.add_argument("--use-gpu", action="store_true", help="one GPU per worker, bf16 autocast")
    g.add_argument("--local", action="store_true",
                   help="run the loop in this process, no Ray workers (debugging; breakpoints work)")
    g.add_argument("--loader-workers", type=int, default=0, help="DataLoader processes per worker")
    g.add_argument("--storage-path", type=Path, default=Path(DEFAULT_STORAGE),
                   help="where checkpoints live; shared storage on a cluster (default ./runs)")
    g.add_argument("--keep-checkpoints", type=int, default=2, help="checkpoints kept, best by val PCK")
    g.add_argument("--max-failures", type=int, default=1, help="restarts after a worker dies (default 1)")
    g.add_argument("--address", default=None, help="Ray cluster address (default: local or RAY_ADDRESS)")
    g = p.add_argument_group("tracking")
    g.add_argument("--experiment", default="capenext", help="MLflow experiment (default capenext)")
    if not sweep:
        g.add_argument("--run-name", default=None, help="run name, the key for resuming "
                       "(default split{K}-{ablation}-{backbone})")
        g.add_argument("--parent-run-id", default=None, help="MLflow parent run (set by the sweep)")
        g.add_argument("--register", default=None, metavar="NAME",
                       help="at the end, register the final checkpoint as a version of the MLflow model NAME "
                            "(python -m jobs.register), so --checkpoint models:/NAME@ALIAS finds it")
        g.add_argument("--register-alias", default=None, metavar="ALIAS",
                       help="with --register: point ALIAS (e.g. champion) at the new version")


def resolve_config(args: argparse.Namespace, backbone: str | None = None) -> RunCfg:
    """Preset + named options + ``--set`` overrides → the run's full config, checked."""
    from capenext.models import available_ablations, available_backbones

    named = {
        "model.ablation": args.ablation, "model.backbone": backbone or args.backbone,
        "model.clip_model": args.clip_model, "model.clip_checkpoint": args.clip_checkpoint,
        "model.backbone_checkpoint": args.backbone_checkpoint, "model.image_embedding": args.image_embedding,
        "optim.epochs": args.epochs, "optim.batch_size": args.batch_size, "optim.seed": args.seed,
        "data.val_episodes": args.val_episodes, "data.test_episodes": args.test_episodes,
        "data.queries": args.test_queries,
        "data.descriptions": getattr(args, "descriptions", None),
        "data.text_variant": getattr(args, "text_variant", None), "data.episodes": getattr(args, "episodes", None),
    }
    try:
        cfg = resolve(args.config, named, args.overrides)
    except ValueError as err:
        raise UsageError(str(err)) from None
    if cfg.model.ablation not in available_ablations():
        raise UsageError(f"unknown ablation {cfg.model.ablation!r}; available: {available_ablations()}")
    if cfg.model.backbone not in available_backbones():
        raise UsageError(f"unknown backbone {cfg.model.backbone!r}; available: {available_backbones()}")
    from capenext.models.backbone import check_drop_path

    try:
        check_drop_path(cfg.model.backbone, cfg.model.drop_path)
    except ValueError as err:
        raise UsageError(str(err)) from None
    if cfg.model.clip_checkpoint is None:
        raise UsageError("no CLIP weights: pass --clip-checkpoint PATH (a local file) or --clip-checkpoint "
                         "random (explicit random init, for tests and smoke runs)")
    check_texts(cfg)
    # the training run's own test draws our episodes
    if cfg.data.episodes == "reference":
        raise UsageError("--episodes reference: the training run's own test draws our episodes; measure its "
                         "checkpoint on the reference's with python -m jobs.evaluate --episodes reference "
                         "--data-root ROOT")
    if cfg.optim.epochs < 1 or cfg.optim.batch_size < 1:
        raise UsageError("--epochs and --batch-size must be positive")
    return cfg


def check_texts(cfg: RunCfg) -> None:
    """The config's descriptions file and text variant read (one line otherwise), before anything slow."""
    from capenext.data.mp100 import DataError, load_descriptions

    if cfg.data.episodes not in ("ours", "reference"):
        raise UsageError(f"data.episodes={cfg.data.episodes!r}; valid: ['ours', 'reference']")
    try:
        load_descriptions(cfg.data.descriptions, cfg.data.text_variant) if cfg.data.descriptions else None
        if cfg.data.descriptions is None and cfg.data.text_variant != "regular":
            raise UsageError(f"--text-variant {cfg.data.text_variant} needs --descriptions FILE (the reference's "
                             "texts, python -m pipelines.descriptions)")
    except DataError as err:
        raise UsageError(str(err)) from None


def needs_image_table(cfg: RunCfg) -> bool:
    """Whether a run reads the image-embedding table (an image stream with precomputed embeddings)."""
    from capenext.models import get_ablation

    return "img" in get_ablation(cfg.model.ablation).streams and cfg.model.image_embedding == "precomputed"


# --- the run's folder -------------------------------------------------------------------------------


def run_dir(storage: Path, run_name: str) -> Path:
    return Path(storage) / run_name


def write_progress(folder: Path, progress: dict[str, Any]) -> None:
    """Write a checkpoint folder's progress last, with the size of every file in it: a folder whose copy
    was cut short (a worker killed while Ray uploads it) does not match and is not resumed from."""
    files = {p.name: p.stat().st_size for p in sorted(folder.iterdir()) if p.is_file() and p.name != PROGRESS_FILE}
    (folder / PROGRESS_FILE).write_text(json.dumps({**progress, "files": files}))


def incomplete(folder: Path) -> str | None:
    """What is missing from a checkpoint folder (``None`` when whole): a file its progress names that is
    absent or of another size than written. A folder without recorded sizes (written before ``progress.json``
    existed, or one whose ``progress.json`` had not been copied yet) needs whole torch archives: a zip's
    directory is at its end, so a file cut short has none."""
    import zipfile

    try:
        files = json.loads((folder / PROGRESS_FILE).read_text()).get("files")
    except OSError:
        files = None
    except ValueError:
        return f"{PROGRESS_FILE} is cut short"
    for name, size in (files or dict.fromkeys((STATE_FILE, CHECKPOINT_FILE))).items():
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        if size is not None and path.stat().st_size != size:
            return f"{name} is {path.stat().st_size} bytes of the {size} written"
        if size is None and not zipfile.is_zipfile(path):
            return f"{name} is not a whole torch archive"
    return None


def complete(folder: Path) -> bool:
    """Whether a checkpoint folder holds every file it was written with (see :func:`incomplete`)."""
    return incomplete(folder) is None


def read_progress(folder: Path) -> dict[str, Any]:
    """A checkpoint folder's epoch, step, best val PCK and run id, without loading its optimiser state
    (a folder written before ``progress.json`` existed is read from ``state.pt``)."""
    path = folder / PROGRESS_FILE
    if path.is_file():
        return json.loads(path.read_text())
    import torch

    state = torch.load(folder / STATE_FILE, map_location="cpu", weights_only=True)
    return {k: state[k] for k in ("epoch", "step", "best", "run_id") if k in state}


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
