"""A training run, typed: :class:`TrainRun` is built once from the command line (or by the sweep and the
quickstart from their own options), passed to the driver and to every Ray Train worker, and logged once
to MLflow (``job.*`` params beside the config's).

:func:`add_arguments` defines the options of one run (``jobs.train``; ``jobs.sweep`` takes the same ones
but ``--split``/``--ablation``/``--backbone``/``--run-name``, which it sets per trial), with the flags of
:mod:`capenext.options`; :func:`resolve_config` turns them into a checked :class:`RunCfg`.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

from capenext.cli import UsageError
from capenext.config import RunCfg, flatten, to_dict
from capenext.options import (add_address, add_config_option, add_config_options, add_device, add_recipe,
                                       add_tracking_uri, config_from_args)

DEFAULT_STORAGE = "runs"
FREEZE_CHOICES = ("backbone", "backbone,encoder")  # --freeze: model parts (attributes) kept fixed


@dataclass
class FineTune:
    """Where a fine-tuning run's first weights come from (``--init-checkpoint``), resolved to a local file."""

    source: str  # what the user wrote: a file, runs:/..., a run id, models:/NAME@ALIAS
    path: str  # the local file
    sha256: str
    run_id: str | None  # the training run that wrote it, when known


@dataclass
class TrainRun:
    """One training run: the config that changes numbers, and where and how it runs."""

    cfg: RunCfg
    split: int
    shards: Path
    embeddings: Path
    run_name: str
    storage: Path = Path(DEFAULT_STORAGE)  # checkpoints and artifacts: <storage>/<run_name>/
    experiment: str = "capenext"
    tracking_uri: str | None = None  # None: MLFLOW_TRACKING_URI, else ./mlflow.db (resolved by the driver)
    device: str = "cpu"  # cpu | cuda (one GPU per Ray Train worker)
    local: bool = False  # the loop in this process, no Ray workers
    num_workers: int = 1
    cpus_per_worker: float = 1.0
    loader_workers: int = 0  # DataLoader processes per worker
    max_failures: int = 1  # worker-group restarts
    keep_checkpoints: int = 2
    val_every: int = 1
    max_steps: int | None = None  # cap on optimizer steps per epoch (tests, smoke runs)
    address: str | None = None  # Ray cluster
    parent_run_id: str | None = None  # the sweep's MLflow parent run
    recipe: str = "default"  # default | paper (capenext.recipe)
    data_root: Path | None = None  # the MP-100 copy the shards came from: the reference's test episodes
    init_checkpoint: str | None = None  # --init-checkpoint as given; resolved into ``init`` by the pre-flight
    freeze: tuple[str, ...] = ()  # model parts kept fixed
    init: FineTune | None = None

    @property
    def world(self) -> int:
        """Processes that share the global batch: 1 in local mode, else the Ray Train workers."""
        return 1 if self.local else self.num_workers

    @property
    def sync_batchnorm(self) -> bool:
        """BatchNorm statistics over the global batch, as the reference's one GPU: the paper recipe, a
        BatchNorm backbone, several workers, on CUDA (torch's SyncBatchNorm runs on CUDA only: on CPU the
        per-worker statistics are a listed departure)."""
        from capenext.recipe import BATCHNORM_BACKBONES

        return (self.recipe == "paper" and self.cfg.model.backbone in BATCHNORM_BACKBONES and self.world > 1
                and self.device == "cuda")

    @property
    def threads(self) -> int:
        """Torch threads in each worker: the CPUs it holds."""
        return max(1, int(self.cpus_per_worker))

    def resolved(self) -> "TrainRun":
        """The same run with absolute paths (what workers on any node, in any directory, need)."""
        return replace(self, shards=Path(self.shards).resolve(), embeddings=Path(self.embeddings).resolve(),
                       storage=Path(self.storage).resolve(),
                       data_root=Path(self.data_root).resolve() if self.data_root is not None else None)

    def departures(self) -> list[str]:
        """Each setting of this run that differs from the paper's (:func:`capenext.recipe.departures`)."""
        from capenext.recipe import JobFacts, departures

        return departures(self.cfg, JobFacts(self.device, self.world, self.val_every, self.sync_batchnorm))

    def params(self) -> dict[str, Any]:
        """What MLflow records: the config's fields, then ``job.<field>`` for where and how it ran."""
        out = flatten(to_dict(self.cfg))
        skip = {"cfg", "init", "tracking_uri", "parent_run_id"}
        for f in fields(self):
            if f.name not in skip:
                value = getattr(self, f.name)
                out[f"job.{f.name}"] = ",".join(value) if isinstance(value, tuple) else value
        if self.init is not None:
            out["init_checkpoint"] = self.init.source
        return out


# --- the command line of a run ----------------------------------------------------------------------


def add_arguments(p: argparse.ArgumentParser, sweep: bool = False) -> None:
    """The options of one run; the sweep takes them too (less the ones it sets per trial)."""
    g = p.add_argument_group("data")
    g.add_argument("--shards", type=Path, required=True, help="shard folder (pipelines.shard)")
    g.add_argument("--embeddings", type=Path, required=True, help="embedding folder (pipelines.embed)")
    add_config_option(g, "descriptions")
    add_config_option(g, "text_variant")
    g.add_argument("--data-root", type=Path, default=None,
                   help="the MP-100 copy the shards were made from: the final test draws the reference's episodes "
                        "from its test annotation file (--sampler reference, the paper recipe's)")
    g = p.add_argument_group("model and schedule")
    add_recipe(g)
    add_config_options(g, *(() if sweep else ("ablation", "backbone")), "clip_model", "clip_checkpoint",
                       "backbone_checkpoint", "image_embedding", "precision", "epochs", "batch_size", "seed")
    g.add_argument("--max-steps", type=int, default=None, help="cap the optimizer steps per epoch (tests)")
    g = p.add_argument_group("fine-tuning")
    g.add_argument("--init-checkpoint", default=None, metavar="CHECKPOINT",
                   help="start from these weights (a file, runs:/<run_id>/..., a run id, models:/NAME@ALIAS, a "
                        "jobs.convert output): model state only, fresh optimiser and schedule; ignored when the "
                        "run resumes from a checkpoint of its own")
    g.add_argument("--freeze", default=None, metavar="PARTS",
                   help=f"keep these parts' weights fixed (few-shot fine-tuning): {' or '.join(FREEZE_CHOICES)}")
    g = p.add_argument_group("evaluation (the test protocol of jobs.evaluate)")
    g.add_argument("--val-every", type=int, default=None,
                   help="validate every N epochs (default 1; the paper recipe's 25)")
    for name in ("val_episodes", "episodes", "queries", "sampler"):
        add_config_option(g, name)
    g = p.add_argument_group("execution")
    add_device(g, "every worker")
    g.add_argument("--num-workers", type=int, default=1, help="Ray Train DDP workers (default 1)")
    g.add_argument("--cpus-per-worker", type=float, default=1, help="CPUs each worker holds (default 1)")
    g.add_argument("--local", action="store_true",
                   help="run the loop in this process, no Ray workers (debugging; breakpoints work)")
    g.add_argument("--loader-workers", type=int, default=0, help="DataLoader processes per worker")
    g.add_argument("--storage-path", type=Path, default=Path(DEFAULT_STORAGE),
                   help="where checkpoints live; shared storage on a cluster (default ./runs)")
    g.add_argument("--keep-checkpoints", type=int, default=2, help="checkpoints kept, best by val PCK")
    g.add_argument("--max-failures", type=int, default=1, help="restarts after a worker dies (default 1)")
    add_address(g)
    g = p.add_argument_group("tracking")
    add_tracking_uri(g)
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


def resolve_config(args: argparse.Namespace, **named: Any) -> RunCfg:
    """Preset + named options (``named`` overrides the command line's: a sweep trial's ablation, backbone,
    seed) + ``--set`` → the run's full config, checked."""
    from capenext.data.mp100 import check_texts
    from capenext.models import available_ablations, available_backbones
    from capenext.models.backbone import check_drop_path

    ns = argparse.Namespace(**{**vars(args), **named})
    try:
        cfg = config_from_args(ns, args.recipe, args.device)
        check_texts(cfg.data)
    except ValueError as err:
        raise UsageError(str(err)) from None
    if args.recipe == "paper" and cfg.data.descriptions is None:
        raise UsageError("--recipe paper trains on the reference's keypoint texts: pass --descriptions FILE, made by "
                         "python -m pipelines.descriptions --reference CHECKOUT --out FILE (from a checkout of the "
                         "official code)")
    if cfg.model.precision == "bf16" and args.device != "cuda":
        raise UsageError("--precision bf16 is autocast on CUDA: add --device cuda, or use fp32")
    if cfg.model.ablation not in available_ablations():
        raise UsageError(f"unknown ablation {cfg.model.ablation!r}; available: {available_ablations()}")
    if cfg.model.backbone not in available_backbones():
        raise UsageError(f"unknown backbone {cfg.model.backbone!r}; available: {available_backbones()}")
    try:
        check_drop_path(cfg.model.backbone, cfg.model.drop_path)
    except ValueError as err:
        raise UsageError(str(err)) from None
    if cfg.model.clip_checkpoint is None:
        raise UsageError("no CLIP weights: pass --clip-checkpoint PATH (a local file) or --clip-checkpoint "
                         "random (explicit random init, for tests and smoke runs)")
    if cfg.data.episodes == "reference" and args.data_root is None:
        raise UsageError("the final test draws the reference's episodes (--sampler reference"
                         + (", the paper recipe's" if args.recipe == "paper" else "") + ") from the split's test "
                         "annotation file: pass --data-root ROOT, the MP-100 copy the shards were made from")
    if args.data_root is not None and not Path(args.data_root).is_dir():
        raise UsageError(f"--data-root {args.data_root}: no such folder")
    if cfg.optim.epochs < 1 or cfg.optim.batch_size < 1:
        raise UsageError("--epochs and --batch-size must be positive")
    return cfg


def parse_freeze(text: str | None) -> tuple[str, ...]:
    """``--freeze backbone,encoder`` → ``("backbone", "encoder")``; one line for anything else."""
    if not text:
        return ()
    parts = tuple(sorted(set(text.split(","))))
    if ",".join(parts) not in {",".join(sorted(c.split(","))) for c in FREEZE_CHOICES}:
        raise UsageError(f"--freeze {text!r}; valid: {', '.join(FREEZE_CHOICES)}")
    return parts


def from_args(args: argparse.Namespace, cfg: RunCfg, split: int, run_name: str,
              parent_run_id: str | None = None) -> TrainRun:
    """The run the command line describes (a sweep trial passes its own config, split and name)."""
    from capenext.recipe import PAPER_VAL_EVERY

    val_every = args.val_every if args.val_every is not None else (PAPER_VAL_EVERY if args.recipe == "paper" else 1)
    return TrainRun(
        cfg=cfg, split=split, shards=args.shards, embeddings=args.embeddings, run_name=run_name,
        storage=args.storage_path, experiment=args.experiment, tracking_uri=args.tracking_uri, device=args.device,
        local=args.local, num_workers=args.num_workers, cpus_per_worker=args.cpus_per_worker,
        loader_workers=args.loader_workers, max_failures=args.max_failures, keep_checkpoints=args.keep_checkpoints,
        val_every=max(1, val_every), max_steps=args.max_steps, address=args.address,
        parent_run_id=parent_run_id, init_checkpoint=args.init_checkpoint,
        freeze=parse_freeze(args.freeze), recipe=args.recipe, data_root=args.data_root,
    )


def default_run_name(split: int, cfg: RunCfg) -> str:
    return f"split{split}-{cfg.model.ablation}-{cfg.model.backbone}"
