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
from jobs.runs import CHECKPOINT_FILE, add_training_arguments, latest_checkpoint, needs_image_table, read_progress
from jobs.runs import resolve_config as _resolve_config
from jobs.tracking import ensure_experiment, log_params, tracking_uri


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


def resolve_config(args: argparse.Namespace, backbone: str | None = None) -> RunCfg:
    """Preset + named options + ``--set`` overrides → the run's full config."""
    return _resolve_config(args, backbone)


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
    index = ShardIndex(args.shards, descriptions=cfg.data.descriptions)
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
    latest = latest_checkpoint(args.storage_path.resolve(), run_name)
    if latest is not None:
        # through the dataclasses, so that a field added since (with its default) is no difference
        old = to_dict(read_checkpoint(latest / CHECKPOINT_FILE)["run_config"])
        diff = config_differences(_comparable(old), _comparable(to_dict(cfg)))
        if diff:
            raise UsageError(f"run {run_name!r} has a checkpoint of another config in {latest} (differs in "
                             f"{', '.join(diff[:5])}): pick another --run-name or --storage-path")
    return {
        "split": args.split, "shards": str(args.shards.resolve()), "embeddings": str(args.embeddings.resolve()),
        "storage": str(args.storage_path.resolve()), "run_name": run_name, "local": bool(args.local),
        "use_gpu": bool(args.use_gpu), "val_every": max(1, args.val_every), "max_steps": args.max_steps,
        "loader_workers": args.loader_workers, "keep": args.keep_checkpoints,
        "threads": max(1, int(args.cpus_per_worker)),
    }


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
    run = client.create_run(exp_id, run_name=job["run_name"], tags=tags)
    params = {**flatten(to_dict(cfg)), **{f"job.{k}": v for k, v in job.items() if k != "tracking_uri"}}
    log_params(client, run.info.run_id, params)
    return run.info.run_id


# --- driver ------------------------------------------------------------------------------------------


def run(args: argparse.Namespace, cfg: RunCfg, run_name: str) -> dict[str, float]:
    """Pre-flight, MLflow run, then the TorchTrainer (or local mode); returns the final metrics."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from jobs.train_loop import train_loop

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
    if args.local and args.use_gpu and not torch.cuda.is_available():
        raise UsageError("--use-gpu with --local but no CUDA device is visible")
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
    result = trainer.fit()
    if result.error is not None:
        raise result.error
    from mlflow.tracking import MlflowClient

    from capenext.metrics import FLOOR

    logged = MlflowClient(job["tracking_uri"]).get_run(run_id).data.metrics
    return {k: v for k, v in sorted(logged.items()) if k.startswith(("test/", f"{FLOOR}/"))}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cfg = resolve_config(args)
    run_name = args.run_name or f"split{args.split}-{cfg.model.ablation}-{cfg.model.backbone}"
    metrics = run(args, cfg, run_name)
    print(json.dumps({"run_name": run_name, **metrics}))
    return 0


if __name__ == "__main__":
    run_main(main)
