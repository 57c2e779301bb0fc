"""The driver of a training run: pre-flight, the MLflow run, the ``TorchTrainer`` (or local mode).

:func:`run` is what ``jobs.train``, each ``jobs.sweep`` trial and ``jobs.quickstart`` call with a
:class:`~jobs.training.spec.TrainRun`; the loop every worker runs is :mod:`jobs.training.loop`. Every bad
input (unknown split, missing shards or embeddings, embeddings from another CLIP, a checkpoint of another
config, an init checkpoint that does not fit, a cluster too small) is one line before any worker starts,
and no MLflow run is left RUNNING.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from capenext.checkpoint import CHECKPOINT_FILE, latest_checkpoint, read_progress, resumable_checkpoint
from capenext.cli import UsageError
from capenext.config import RunCfg, to_dict
from capenext.data.mp100 import check_split
from jobs.training.spec import FineTune, TrainRun
from jobs.runtime.cluster import check_cluster, init_ray
from jobs.runtime.tracking import end_run, ensure_experiment, interrupts_raise, log_params, tracking_uri


def _comparable(cfg: dict[str, Any]) -> dict[str, Any]:
    """What must not change when a run resumes (the number of epochs may grow)."""
    cfg = json.loads(json.dumps(cfg))
    cfg["optim"].pop("epochs", None)
    cfg["model"].pop("backbone_checkpoint", None)
    return cfg


def preflight(run: TrainRun) -> TrainRun:
    """Check every input a worker will open, before any worker (or retry) starts; return the run with
    absolute paths and its fine-tuning source resolved."""
    from capenext.checkpoint import config_differences, read_checkpoint
    from capenext.data.embeddings import check_tables, needs_image_table
    from capenext.data.shards import ShardIndex

    cfg = run.cfg
    check_split(run.split)
    if cfg.model.backbone_checkpoint is not None and not Path(cfg.model.backbone_checkpoint).is_file():
        raise UsageError(f"--backbone-checkpoint {cfg.model.backbone_checkpoint}: no such file (a local "
                         "weights file; leave it out for random init)")
    if cfg.model.backbone_checkpoint is not None:  # read and mapped once here: a file that does not fit is one line
        from capenext.models.backbone import create_backbone

        try:
            create_backbone(cfg.model.backbone, dim=cfg.model.dim, checkpoint=cfg.model.backbone_checkpoint,
                            drop_path=cfg.model.drop_path)
        except ValueError as err:
            raise UsageError(f"--backbone-checkpoint {cfg.model.backbone_checkpoint}: {err}") from None
    if cfg.model.clip_checkpoint != "random" and not Path(cfg.model.clip_checkpoint).is_file():
        raise UsageError(f"--clip-checkpoint {cfg.model.clip_checkpoint}: no such file (or use 'random')")
    if run.device == "cuda" and run.local and not torch.cuda.is_available():
        raise UsageError("--device cuda with --local but no CUDA device is visible")
    index = ShardIndex(run.shards, descriptions=cfg.data.descriptions, text_variant=cfg.data.text_variant)
    for subset in ("train", "val", "test"):
        if not index.subset(run.split, subset).samples:
            raise UsageError(f"split {run.split} has no {subset} samples in {run.shards}")
    check_tables(run.embeddings, cfg, index.digest, images=needs_image_table(cfg),
                 remake=f"python -m pipelines.embed --shards {run.shards} --out {run.embeddings} and this "
                        "run's --recipe/--config/--set/--clip-* options")
    if cfg.data.episodes == "reference":  # the final test's episodes: the annotation file is there and matches
        from capenext.protocol import reference_pairs

        reference_pairs(run.data_root, run.split, index, index.subset(run.split, "test"), cfg.data.test_episodes,
                        cfg.data.queries)
    if run.num_workers < 1:
        raise UsageError("--num-workers must be at least 1 (use --local for an in-process run)")
    if cfg.optim.batch_size % run.world:
        raise UsageError(f"--batch-size {cfg.optim.batch_size} is not divisible by --num-workers "
                         f"{run.num_workers}: the global batch stays fixed across workers")
    run = run.resolved()
    latest = resumable_checkpoint(run.storage, run.run_name)
    # through the dataclasses, so that a field added since (with its default) is no difference
    old = to_dict(read_checkpoint(latest / CHECKPOINT_FILE)["run_config"]) if latest is not None else None
    run = fine_tuning(run, old, index)
    if latest is not None:
        diff = config_differences(_comparable(old), _comparable(to_dict(run.cfg)))
        if diff:
            raise UsageError(f"run {run.run_name!r} has a checkpoint of another config in {latest} (differs in "
                             f"{', '.join(diff[:5])}): pick another --run-name or --storage-path")
    return run


def steps_per_epoch(run: TrainRun, train) -> int:
    """Optimizer steps in one epoch: the class-balanced pairs (as many every epoch), an equal share per
    worker, whole per-worker batches, at most ``max_steps``."""
    from capenext.data import training_pairs

    pairs = len(training_pairs(train.by_category(), run.cfg.optim.seed, 0))
    steps = (pairs // run.world) // (run.cfg.optim.batch_size // run.world)
    return min(steps, run.max_steps) if run.max_steps is not None else steps


def short_warmup(warmup: int, epochs: int, steps: int) -> int:
    """A warm-up longer than the whole run becomes a tenth of the run (at least one step)."""
    total = epochs * steps
    return max(1, total // 10) if warmup > total else warmup


def check_init_weights(spec: str, path: Path, cfg: RunCfg) -> None:
    """One line naming every tensor of the init checkpoint that does not fit this run's model (shape,
    missing or unexpected), checked against a model built here without reading any weights file."""
    from capenext.checkpoint import FROZEN_PREFIX, read_checkpoint
    from capenext.config import from_dict
    from capenext.models import build_model

    state = read_checkpoint(path)["model"]
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


def fine_tuning(run: TrainRun, old: dict[str, Any] | None, index) -> TrainRun:
    """``--init-checkpoint``: resolved to a local file and checked against the model. A fine-tuning run's
    warm-up longer than the whole run is shortened in its config (a resumed one keeps the warm-up it
    started with); a run resuming from a checkpoint of its own ignores the init checkpoint."""
    from capenext.files import file_sha256
    from jobs.runtime.checkpoints import resolve_checkpoint

    spec = run.init_checkpoint
    if spec is None:
        return run
    cfg = run.cfg
    steps = steps_per_epoch(run, index.subset(run.split, "train"))
    wanted = cfg.optim.warmup_iters
    if old is not None:
        if old["optim"]["warmup_iters"] == short_warmup(wanted, old["optim"]["epochs"], steps):
            cfg.optim.warmup_iters = old["optim"]["warmup_iters"]
        print(f"note: run {run.run_name!r} resumes from a checkpoint of its own; --init-checkpoint {spec} is "
              "ignored", flush=True)
        return replace(run, init_checkpoint=None)
    cfg.optim.warmup_iters = short_warmup(wanted, cfg.optim.epochs, steps)
    if cfg.optim.warmup_iters != wanted:
        epochs = f"{cfg.optim.epochs} epoch{'s' * (cfg.optim.epochs != 1)}"
        print(f"note: the warm-up of {wanted} steps is longer than the whole run ({epochs} of {steps} steps); "
              f"optim.warmup_iters shortened to {cfg.optim.warmup_iters}", flush=True)
    source = resolve_checkpoint(spec, tracking_uri(run.tracking_uri), run.storage / run.run_name / "init")
    check_init_weights(spec, source.path, cfg)
    return replace(run, init=FineTune(spec, str(source.path.resolve()), file_sha256(source.path), source.run_id))


def start_mlflow_run(run: TrainRun, resume_from: Path | None) -> str:
    """The run id: the checkpoint's when resuming, else a new run with params and tags."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(run.tracking_uri)
    if resume_from is not None:
        run_id = read_progress(resume_from)["run_id"]
        client.update_run(run_id, status="RUNNING")
        return run_id
    cfg = run.cfg
    exp_id = ensure_experiment(client, run.experiment, run.tracking_uri)
    tags = {"split": str(run.split), "ablation": cfg.model.ablation, "backbone": cfg.model.backbone,
            "capenext.run_name": run.run_name, "mlflow.runName": run.run_name,
            "image_embedding": cfg.model.image_embedding, "seed": str(cfg.optim.seed), "recipe": run.recipe,
            "paper_departures": "; ".join(run.departures()) or "none"}
    if run.parent_run_id:
        tags["mlflow.parentRunId"] = run.parent_run_id
    if run.init is not None:  # a fine-tuning run: where its first weights came from
        tags.update({"init_checkpoint": run.init.source, "init_checkpoint_sha256": run.init.sha256})
        if run.init.run_id:
            tags["init_run_id"] = run.init.run_id
    created = client.create_run(exp_id, run_name=run.run_name, tags=tags)
    try:
        log_params(client, created.info.run_id, run.params())
    except BaseException as err:
        end_run(client, created.info.run_id, err)
        raise
    return created.info.run_id


def trainer(run: TrainRun, run_id: str):
    """The ``TorchTrainer`` of the run (``num_workers=0`` in local mode: the loop runs in this process)."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from jobs.training.loop import train_loop

    scaling = ScalingConfig(
        num_workers=0 if run.local else run.num_workers, use_gpu=run.device == "cuda" and not run.local,
        resources_per_worker=None if run.local else {"CPU": run.cpus_per_worker},
    )
    return TorchTrainer(
        train_loop,
        train_loop_config={"run": run, "run_id": run_id},
        scaling_config=scaling,
        run_config=RunConfig(
            name=run.run_name,
            storage_path=str(run.storage),
            failure_config=FailureConfig(max_failures=run.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=run.keep_checkpoints,
                                               checkpoint_score_attribute="val/pck_0.2",
                                               checkpoint_score_order="max"),
        ),
    )


def run(spec: TrainRun) -> dict[str, float]:
    """Pre-flight, MLflow run, then the TorchTrainer (or local mode); returns the final metrics."""
    from mlflow.tracking import MlflowClient

    from capenext.metrics import FLOOR

    spec = replace(spec, tracking_uri=tracking_uri(spec.tracking_uri))
    spec = preflight(spec)
    resume = latest_checkpoint(spec.storage, spec.run_name)
    if not spec.local:
        init_ray(spec.address, log_to_driver=True)
        check_cluster(spec.num_workers, spec.cpus_per_worker, spec.device == "cuda")
    with interrupts_raise():  # SIGTERM: the run is recorded KILLED (local mode has no Ray handler for it)
        run_id = start_mlflow_run(spec, resume)
        try:
            result = trainer(spec, run_id).fit()
            if result.error is not None:
                raise result.error
        except BaseException as err:  # a failed or interrupted run never stays RUNNING
            end_run(MlflowClient(spec.tracking_uri), run_id, err)
            raise
    logged = MlflowClient(spec.tracking_uri).get_run(run_id).data.metrics
    return {k: v for k, v in sorted(logged.items()) if k.startswith(("test/", f"{FLOOR}/"))}
