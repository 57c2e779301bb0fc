"""One training run: ``python -m jobs.train --split K --ablation NAME --shards DIR --embeddings DIR``.

Ray Train V2: a ``TorchTrainer`` runs :func:`train_loop` on ``--num-workers`` DDP workers (gloo on CPU,
NCCL on GPU); ``--local`` runs the *same* function in this process (Ray Train's local mode,
``ScalingConfig(num_workers=0)``), where breakpoints work. The run:

* reads the shards and the precomputed CLIP embeddings (an ablation without an image stream reads no
  image table; ``--image-embedding online`` computes it from the augmented crop inside the forward);
* draws class-balanced pairs every epoch from ``(seed, epoch)``; each worker takes an equal, strided
  share (the remainder is dropped, so every worker runs the same number of steps and nothing hangs) and
  the global batch stays ``--batch-size`` whatever the number of workers;
* follows the reference's schedule: Adam, lr 1e-5, no weight decay, no clipping, linear warm-up over
  1000 iterations from 0.001×, lr ÷10 at 80 % and 90 % of the epochs; bf16 autocast on GPU; seeded;
* every ``--val-every`` epochs measures PCK@0.2 on the split's val categories (100 × 15 episodes), and
  at the end PCK@0.05-0.25 and their mean on the test categories (200 × 15 episodes);
* reports a checkpoint every epoch (``CheckpointConfig`` keeps the ``--keep-checkpoints`` best by val
  PCK@0.2, and Ray keeps the latest too); re-running with the same ``--run-name`` and
  ``--storage-path`` resumes from the latest (``ray.train.get_checkpoint()``), in the same MLflow run;
  ``FailureConfig(max_failures)`` restarts the run after a worker dies;
* logs to MLflow from rank 0 only: the whole config as params, tags split/ablation/backbone, per-epoch
  metrics (``train/loss`` and each term, ``val/pck_0.2``, ``test/pck_0.05`` ... ``test/pck_mean``, the
  mean-position floor's ``floor/pck_*``), the final and best checkpoints as artifacts. The driver creates
  the run; its id travels in the checkpoint.

This module is the driver (parse, pre-flight, ``TorchTrainer``, ``fit``); the loop is
:mod:`jobs.train_loop`, the options and the run's files :mod:`jobs.runs`.

Every bad input (unknown split, ablation or backbone, missing shards or embeddings, embeddings from
another CLIP, a checkpoint of another config, a cluster too small) is one line before any worker starts.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch

from capenext.cli import UsageError, run_main
from capenext.config import RunCfg, to_dict
from capenext.data.mp100 import check_split
from jobs.common import check_cluster, init_ray
from jobs.runs import (CHECKPOINT_FILE, add_training_arguments, latest_checkpoint, needs_image_table, read_progress,
                       resumable_checkpoint)
from jobs.runs import resolve_config  # noqa: F401  (jobs.train's public resolve_config: the sweep's and quickstart's)
from jobs.tracking import end_run, ensure_experiment, log_params, tracking_uri


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m jobs.train",
        description="Train CapeNext on one MP-100 split and ablation with Ray Train (DDP), evaluate PCK on "
                    "the split's unseen test categories and record everything in MLflow.",
    )
    p.add_argument("--split", type=int, required=True, help="MP-100 split, 1-5")
    p.add_argument("--ablation", default="full", help="ablation preset (default full)")
    add_training_arguments(p)
    return p.parse_args(argv)


# --- pre-flight: everything that can be wrong, before a worker starts ------------------------------


def _comparable(cfg: dict[str, Any]) -> dict[str, Any]:
    """What must not change when a run resumes (the number of epochs may grow)."""
    cfg = json.loads(json.dumps(cfg))
    cfg["optim"].pop("epochs", None)
    cfg["model"].pop("backbone_checkpoint", None)
    return cfg


def preflight(args: argparse.Namespace, cfg: RunCfg, run_name: str) -> dict[str, Any]:
    """Check inputs; return the job options every worker gets."""
    from capenext.checkpoint import config_differences, read_checkpoint
    from capenext.data.embeddings import check_tables
    from capenext.data.shards import ShardIndex

    check_split(args.split)
    # every file a worker will open is checked here, before any worker (or retry) starts
    if cfg.model.backbone_checkpoint is not None and not Path(cfg.model.backbone_checkpoint).is_file():
        raise UsageError(f"--backbone-checkpoint {cfg.model.backbone_checkpoint}: no such file (a local "
                         "weights file; leave it out for random init)")
    if cfg.model.clip_checkpoint != "random" and not Path(cfg.model.clip_checkpoint).is_file():
        raise UsageError(f"--clip-checkpoint {cfg.model.clip_checkpoint}: no such file (or use 'random')")
    index = ShardIndex(args.shards, descriptions=cfg.data.descriptions, text_variant=cfg.data.text_variant)
    for subset in ("train", "val", "test"):
        if not index.subset(args.split, subset).samples:
            raise UsageError(f"split {args.split} has no {subset} samples in {args.shards}")
    check_tables(args.embeddings, cfg, index.digest, images=needs_image_table(cfg),
                 remake=f"python -m pipelines.embed --shards {args.shards} --out {args.embeddings} and this "
                        "run's --config/--set/--clip-* options")
    if args.num_workers < 1:
        raise UsageError("--num-workers must be at least 1 (use --local for an in-process run)")
    if cfg.optim.batch_size % args.num_workers:
        raise UsageError(f"--batch-size {cfg.optim.batch_size} is not divisible by --num-workers "
                         f"{args.num_workers}: the global batch stays fixed across workers")
    latest = resumable_checkpoint(args.storage_path.resolve(), run_name)
    # through the dataclasses, so that a field added since (with its default) is no difference
    old = to_dict(read_checkpoint(latest / CHECKPOINT_FILE)["run_config"]) if latest is not None else None
    tuning = fine_tuning(args, cfg, run_name, old, index)
    if latest is not None:
        diff = config_differences(_comparable(old), _comparable(to_dict(cfg)))
        if diff:
            raise UsageError(f"run {run_name!r} has a checkpoint of another config in {latest} (differs in "
                             f"{', '.join(diff[:5])}): pick another --run-name or --storage-path")
    return {
        "split": args.split, "shards": str(args.shards.resolve()), "embeddings": str(args.embeddings.resolve()),
        "storage": str(args.storage_path.resolve()), "run_name": run_name, "local": bool(args.local),
        "use_gpu": bool(args.use_gpu), "val_every": max(1, args.val_every), "max_steps": args.max_steps,
        "loader_workers": args.loader_workers, "keep": args.keep_checkpoints,
        "threads": max(1, int(args.cpus_per_worker)), **tuning,
    }


def steps_per_epoch(args: argparse.Namespace, cfg: RunCfg, train) -> int:
    """Optimizer steps in one epoch: the class-balanced pairs (as many every epoch), an equal share per
    worker, whole per-worker batches, at most ``--max-steps``."""
    from capenext.data import training_pairs

    world = 1 if args.local else args.num_workers
    pairs = len(training_pairs(train.by_category(), cfg.optim.seed, 0))
    steps = (pairs // world) // (cfg.optim.batch_size // world)
    return min(steps, args.max_steps) if args.max_steps is not None else steps


def short_warmup(warmup: int, epochs: int, steps: int) -> int:
    """A warm-up longer than the whole run becomes a tenth of the run (at least one step)."""
    total = epochs * steps
    return max(1, total // 10) if warmup > total else warmup


def check_init_weights(spec: str, path: Path, cfg: RunCfg) -> None:
    """One line naming every tensor of the init checkpoint that does not fit this run's model (shape,
    missing or unexpected), checked against a model built here without reading any weights file."""
    from capenext.checkpoint import FROZEN_PREFIX, LEGACY_PREFIXES, read_checkpoint
    from capenext.config import from_dict
    from capenext.models import build_model

    state = read_checkpoint(path)["model"]
    for old, new in LEGACY_PREFIXES.items():
        state = {new + k[len(old):] if k.startswith(old) else k: v for k, v in state.items()}
    probe = from_dict(to_dict(cfg))
    probe.model.clip_checkpoint, probe.model.backbone_checkpoint = "random", None  # shapes only
    with torch.no_grad():
        want = {k: tuple(v.shape) for k, v in build_model(probe.model).state_dict().items()
                if not k.startswith(FROZEN_PREFIX)}
    problems = [f"{k} is {tuple(v.shape)} there, {want[k]} here" for k, v in state.items()
                if k in want and tuple(v.shape) != want[k]]
    problems += [f"{k} missing there" for k in want if k not in state]
    problems += [f"{k} not in this model" for k in state if k not in want]
    if problems:
        shown = "; ".join(problems[:6]) + (f"; ... ({len(problems) - 6} more)" if len(problems) > 6 else "")
        raise UsageError(f"--init-checkpoint {spec}: {len(problems)} tensor(s) do not fit this run's model "
                         f"({cfg.model.backbone}, {cfg.model.ablation}, dim {cfg.model.dim}): {shown}")


def fine_tuning(args: argparse.Namespace, cfg: RunCfg, run_name: str, old: dict[str, Any] | None,
                index) -> dict[str, Any]:
    """``--init-checkpoint`` and ``--freeze``: the job options the loop reads, and the source recorded in
    MLflow. A fine-tuning run's warm-up longer than the whole run is shortened in ``cfg`` (a resumed one
    keeps the warm-up it started with); a run resuming from a checkpoint of its own ignores the init
    checkpoint."""
    from capenext.files import file_sha256
    from jobs.common import resolve_checkpoint
    from jobs.runs import FREEZE_CHOICES

    freeze = getattr(args, "freeze", None)
    parts = sorted(set(freeze.split(","))) if freeze else []
    if freeze and ",".join(parts) not in {",".join(sorted(c.split(","))) for c in FREEZE_CHOICES}:
        raise UsageError(f"--freeze {freeze!r}; valid: {', '.join(FREEZE_CHOICES)}")
    job = {"freeze": ",".join(parts), "init_checkpoint": None}
    spec = getattr(args, "init_checkpoint", None)
    if spec is None:
        return job
    steps = steps_per_epoch(args, cfg, index.subset(args.split, "train"))
    wanted = cfg.optim.warmup_iters
    if old is not None:
        if old["optim"]["warmup_iters"] == short_warmup(wanted, old["optim"]["epochs"], steps):
            cfg.optim.warmup_iters = old["optim"]["warmup_iters"]
        print(f"note: run {run_name!r} resumes from a checkpoint of its own; --init-checkpoint {spec} is ignored",
              flush=True)
        return job
    cfg.optim.warmup_iters = short_warmup(wanted, cfg.optim.epochs, steps)
    if cfg.optim.warmup_iters != wanted:
        epochs = f"{cfg.optim.epochs} epoch{'s' * (cfg.optim.epochs != 1)}"
        print(f"note: the warm-up of {wanted} steps is longer than the whole run ({epochs} of {steps} steps); "
              f"optim.warmup_iters shortened to {cfg.optim.warmup_iters}", flush=True)
    source = resolve_checkpoint(spec, tracking_uri(), args.storage_path.resolve() / run_name / "init")
    check_init_weights(spec, source.path, cfg)
    return {**job, "init_checkpoint": str(source.path.resolve()), "init_source": spec,
            "init_sha256": file_sha256(source.path), "init_run_id": source.run_id}


# --- MLflow: the driver creates the run; rank 0 logs -----------------------------------------------


def start_mlflow_run(args: argparse.Namespace, cfg: RunCfg, job: dict[str, Any], resume_from: Path | None) -> str:
    """The run id: the checkpoint's when resuming, else a new run with params and tags."""
    from mlflow.tracking import MlflowClient

    from capenext.config import flatten

    uri = job["tracking_uri"]
    client = MlflowClient(uri)
    if resume_from is not None:
        run_id = read_progress(resume_from)["run_id"]
        client.update_run(run_id, status="RUNNING")
        return run_id
    exp_id = ensure_experiment(client, args.experiment, uri)
    tags = {"split": str(job["split"]), "ablation": cfg.model.ablation, "backbone": cfg.model.backbone,
            "capenext.run_name": job["run_name"], "mlflow.runName": job["run_name"],
            "image_embedding": cfg.model.image_embedding, "seed": str(cfg.optim.seed)}
    if getattr(args, "parent_run_id", None):
        tags["mlflow.parentRunId"] = args.parent_run_id
    if job.get("init_checkpoint"):  # a fine-tuning run: where its first weights came from
        tags.update({"init_checkpoint": job["init_source"], "init_checkpoint_sha256": job["init_sha256"]})
        if job["init_run_id"]:
            tags["init_run_id"] = job["init_run_id"]
    run = client.create_run(exp_id, run_name=job["run_name"], tags=tags)
    params = {**flatten(to_dict(cfg)), **{f"job.{k}": v for k, v in job.items() if k != "tracking_uri"}}
    if job.get("init_checkpoint"):
        params["init_checkpoint"] = job["init_source"]
    log_params(client, run.info.run_id, params)
    return run.info.run_id


# --- driver ------------------------------------------------------------------------------------------


def run(args: argparse.Namespace, cfg: RunCfg, run_name: str) -> dict[str, float]:
    """Pre-flight, MLflow run, then the TorchTrainer (or local mode); returns the final metrics."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from jobs.train_loop import train_loop

    if args.local and args.use_gpu and not torch.cuda.is_available():
        raise UsageError("--use-gpu with --local but no CUDA device is visible")
    job = preflight(args, cfg, run_name)
    job["tracking_uri"] = tracking_uri()
    resume = latest_checkpoint(Path(job["storage"]), run_name)
    if not args.local:
        init_ray(args.address, log_to_driver=True)
        check_cluster(args.num_workers, args.cpus_per_worker, args.use_gpu)
    run_id = start_mlflow_run(args, cfg, job, resume)
    config = {"run": to_dict(cfg), "job": job, "run_id": run_id, "tracking_uri": job["tracking_uri"]}
    scaling = ScalingConfig(
        num_workers=0 if args.local else args.num_workers, use_gpu=bool(args.use_gpu) and not args.local,
        resources_per_worker=None if args.local else {"CPU": args.cpus_per_worker},
    )
    trainer = TorchTrainer(
        train_loop,
        train_loop_config=config,
        scaling_config=scaling,
        run_config=RunConfig(
            name=run_name,
            storage_path=job["storage"],
            failure_config=FailureConfig(max_failures=args.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=args.keep_checkpoints,
                                               checkpoint_score_attribute="val/pck_0.2",
                                               checkpoint_score_order="max"),
        ),
    )
    from mlflow.tracking import MlflowClient

    try:
        result = trainer.fit()
        if result.error is not None:
            raise result.error
    except BaseException as err:  # a failed or interrupted run never stays RUNNING
        end_run(MlflowClient(job["tracking_uri"]), run_id, err)
        raise

    from capenext.metrics import FLOOR

    logged = MlflowClient(job["tracking_uri"]).get_run(run_id).data.metrics
    return {k: v for k, v in sorted(logged.items()) if k.startswith(("test/", f"{FLOOR}/"))}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cfg = resolve_config(args)
    run_name = args.run_name or f"split{args.split}-{cfg.model.ablation}-{cfg.model.backbone}"
    if args.register_alias and not args.register:
        raise UsageError("--register-alias needs --register NAME")
    metrics = run(args, cfg, run_name)
    print(json.dumps({"run_name": run_name, **metrics}))
    if args.register:
        from jobs import register

        final = args.storage_path.resolve() / run_name / "artifacts" / "final.pt"
        return register.main([str(final), "--name", args.register]
                             + (["--alias", args.register_alias] if args.register_alias else []))
    return 0


if __name__ == "__main__":
    run_main(main)
