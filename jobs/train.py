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
  metrics (``train/loss`` and each term, ``val/pck_0.2``, ``test/pck_0.05`` ... ``test/pck_mean``), the final and best
  checkpoints as artifacts. The driver creates the run; its id travels in the checkpoint.

Every bad input (unknown split, ablation or backbone, missing shards or embeddings, embeddings from
another CLIP, a checkpoint of another config, a cluster too small) is one line before any worker starts.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from capenext.cli import UsageError, run_main
from capenext.config import RunCfg, THRESHOLDS, available_presets, from_dict, load_preset, override, to_dict
from capenext.data.mp100 import check_split

DEFAULT_STORAGE = "runs"
CHECKPOINT_FILE = "model.pt"
STATE_FILE = "state.pt"


# --- command line -----------------------------------------------------------------------------------


def add_training_arguments(p: argparse.ArgumentParser, sweep: bool = False) -> None:
    """The options of one run; the sweep passes them on to each trial."""
    g = p.add_argument_group("data")
    g.add_argument("--shards", type=Path, required=True, help="shard folder (pipelines.shard)")
    g.add_argument("--embeddings", type=Path, required=True, help="embedding folder (pipelines.embed)")
    g = p.add_argument_group("model and schedule")
    g.add_argument("--config", default=None,
                   help=f"config preset (default: 'tiny' for the tiny backbone, else 'swinv2_t'); one of "
                        f"{available_presets()}")
    g.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override any config field, e.g. --set optim.lr=2e-5 (repeatable)")
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
    g = p.add_argument_group("evaluation")
    g.add_argument("--val-every", type=int, default=1, help="validate every N epochs (default 1)")
    g.add_argument("--val-episodes", type=int, default=None, help="val episodes per category (default 100)")
    g.add_argument("--test-episodes", type=int, default=None, help="test episodes per category (default 200)")
    g.add_argument("--test-queries", type=int, default=None, help="queries per episode (default 15)")
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
    from capenext.models import available_ablations, available_backbones

    backbone = backbone or args.backbone
    preset = args.config or ("tiny" if backbone == "tiny" else "swinv2_t")
    cfg = load_preset(preset)
    named = {
        "model.ablation": args.ablation, "model.backbone": backbone, "model.clip_model": args.clip_model,
        "model.clip_checkpoint": args.clip_checkpoint, "model.backbone_checkpoint": args.backbone_checkpoint,
        "model.image_embedding": args.image_embedding, "optim.epochs": args.epochs,
        "optim.batch_size": args.batch_size, "optim.seed": args.seed, "data.val_episodes": args.val_episodes,
        "data.test_episodes": args.test_episodes, "data.queries": args.test_queries,
    }
    dotted = {k: str(v) for k, v in named.items() if v is not None}
    for item in args.overrides:
        if "=" not in item:
            raise UsageError(f"--set expects KEY=VALUE, got {item!r}")
        key, value = item.split("=", 1)
        dotted[key.strip()] = value.strip()
    cfg = override(cfg, dotted)
    if cfg.model.ablation not in available_ablations():
        raise UsageError(f"unknown ablation {cfg.model.ablation!r}; available: {available_ablations()}")
    if cfg.model.backbone not in available_backbones():
        raise UsageError(f"unknown backbone {cfg.model.backbone!r}; available: {available_backbones()}")
    if cfg.model.clip_checkpoint is None:
        raise UsageError("no CLIP weights: pass --clip-checkpoint PATH (a local file) or --clip-checkpoint "
                         "random (explicit random init, for tests and smoke runs)")
    if cfg.optim.epochs < 1 or cfg.optim.batch_size < 1:
        raise UsageError("--epochs and --batch-size must be positive")
    return cfg


# --- pre-flight: everything that can be wrong, before a worker starts ------------------------------


def needs_image_table(cfg: RunCfg) -> bool:
    from capenext.models import get_ablation

    return "img" in get_ablation(cfg.model.ablation).streams and cfg.model.image_embedding == "precomputed"


def run_dir(storage: Path, run_name: str) -> Path:
    return storage / run_name


def latest_checkpoint(storage: Path, run_name: str) -> Path | None:
    """The newest checkpoint folder of a run, Ray's or local mode's."""
    base = run_dir(storage, run_name)
    found = [p.parent for p in base.glob("checkpoint_*/" + STATE_FILE)]
    found += [p.parent for p in (base / "local").glob("checkpoint_*/" + STATE_FILE)]
    if not found:
        return None
    return max(found, key=lambda p: torch.load(p / STATE_FILE, map_location="cpu", weights_only=True)["step"])


def _comparable(cfg: dict[str, Any]) -> dict[str, Any]:
    """What must not change when a run resumes (the number of epochs may grow)."""
    cfg = json.loads(json.dumps(cfg))
    cfg["optim"].pop("epochs", None)
    cfg["model"].pop("backbone_checkpoint", None)
    return cfg


def preflight(args: argparse.Namespace, cfg: RunCfg, run_name: str) -> dict[str, Any]:
    """Check inputs; return the job options every worker gets."""
    from capenext.checkpoint import config_differences, read_checkpoint
    from capenext.data.shards import ShardIndex
    from pipelines.embed import check_metadata, checkpoint_id

    check_split(args.split)
    index = ShardIndex(args.shards)
    for subset in ("train", "val", "test"):
        if not index.subset(args.split, subset).samples:
            raise UsageError(f"split {args.split} has no {subset} samples in {args.shards}")
    expected = {"clip_model": cfg.model.clip_model, "manifest_digest": index.digest,
                "clip_checkpoint_sha256": checkpoint_id(cfg.model.clip_checkpoint)}
    if needs_image_table(cfg):
        expected["image_size"] = cfg.data.image_size
    check_metadata(args.embeddings, expected)
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


def check_cluster(args: argparse.Namespace) -> None:
    """Fail fast when the cluster cannot hold the workers asked for (instead of waiting forever)."""
    import ray

    total = ray.cluster_resources()
    need_cpu = args.num_workers * args.cpus_per_worker
    if need_cpu > total.get("CPU", 0):
        raise UsageError(f"asked for {args.num_workers} workers x {args.cpus_per_worker} CPUs = {need_cpu:g} CPUs, "
                         f"the Ray cluster has {total.get('CPU', 0):g}: lower --num-workers or --cpus-per-worker")
    if args.use_gpu and args.num_workers > total.get("GPU", 0):
        raise UsageError(f"asked for {args.num_workers} GPU workers, the Ray cluster has "
                         f"{total.get('GPU', 0):g} GPUs")


# --- MLflow (driver creates; rank 0 logs) ----------------------------------------------------------


def tracking_uri() -> str:
    """``MLFLOW_TRACKING_URI``, else ``sqlite:///<cwd>/mlflow.db`` made absolute so every worker, whatever
    its working directory, writes to the same store."""
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    return f"sqlite:///{Path('mlflow.db').resolve()}"


def ensure_experiment(client, name: str, uri: str) -> str:
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    artifacts = None
    if uri.startswith("sqlite:///"):  # keep artifacts beside the database, not in a cwd-relative ./mlruns
        artifacts = (Path(uri[len("sqlite:///"):]).parent / "mlartifacts").resolve().as_uri()
    return client.create_experiment(name, artifact_location=artifacts)


def start_mlflow_run(args: argparse.Namespace, cfg: RunCfg, job: dict[str, Any], resume_from: Path | None) -> str:
    """The run id: the checkpoint's when resuming, else a new run with params and tags."""
    from mlflow.tracking import MlflowClient

    from capenext.config import flatten

    uri = job["tracking_uri"]
    client = MlflowClient(uri)
    if resume_from is not None:
        run_id = torch.load(resume_from / STATE_FILE, map_location="cpu", weights_only=True)["run_id"]
        client.update_run(run_id, status="RUNNING")
        return run_id
    exp_id = ensure_experiment(client, args.experiment, uri)
    tags = {"split": str(job["split"]), "ablation": cfg.model.ablation, "backbone": cfg.model.backbone,
            "capenext.run_name": job["run_name"], "mlflow.runName": job["run_name"],
            "image_embedding": cfg.model.image_embedding, "seed": str(cfg.optim.seed)}
    if getattr(args, "parent_run_id", None):
        tags["mlflow.parentRunId"] = args.parent_run_id
    run = client.create_run(exp_id, run_name=job["run_name"], tags=tags)
    from mlflow.entities import Param

    params = {**flatten(to_dict(cfg)), **{f"job.{k}": v for k, v in job.items() if k != "tracking_uri"}}
    items = [Param(k, str(v)[:6000]) for k, v in params.items()]
    for i in range(0, len(items), 100):
        client.log_batch(run.info.run_id, params=items[i: i + 100])
    return run.info.run_id


# --- the loop (every worker; or this process with --local) -----------------------------------------


def lr_factor(step: int, epoch: int, cfg: RunCfg) -> float:
    """Linear warm-up from ``warmup_ratio`` over ``warmup_iters`` steps, ÷10 at each ``lr_steps`` fraction."""
    o = cfg.optim
    warm = 1.0
    if step < o.warmup_iters:
        warm = o.warmup_ratio + (1 - o.warmup_ratio) * step / o.warmup_iters
    decay = 0.1 ** sum(epoch >= int(round(f * o.epochs)) for f in o.lr_steps)
    return warm * decay


def _collate(items: list[dict]) -> dict:
    return {k: torch.stack([it[k] for it in items]) for k in items[0]}


def _all_mean(values: dict[str, float], device: torch.device) -> dict[str, float]:
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or not values:
        return values
    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return dict(zip(keys, (t / dist.get_world_size()).tolist()))


class Tracker:
    """Rank 0's MLflow logging; a no-op on other ranks."""

    def __init__(self, uri: str, run_id: str, active: bool):
        self.run_id, self.client = run_id, None
        if active:
            from mlflow.tracking import MlflowClient

            self.client = MlflowClient(uri)

    def metrics(self, values: dict[str, float], step: int) -> None:
        if self.client is None:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, float(v), now, step) for k, v in values.items()])

    def artifact(self, path: Path, folder: str) -> None:
        if self.client is not None:
            self.client.log_artifact(self.run_id, str(path), folder)

    def finish(self) -> None:
        if self.client is not None:
            self.client.set_terminated(self.run_id, "FINISHED")


def _restore(job: dict[str, Any]) -> Path | None:
    """Where to resume from: Ray's restored checkpoint, or (local mode) the newest local one."""
    import ray.train

    ckpt = ray.train.get_checkpoint()
    if ckpt is not None:
        return Path(ckpt.path)
    if job["local"]:
        return latest_checkpoint(Path(job["storage"]), job["run_name"])
    return None


def _local_keep(folder: Path, keep: int) -> None:
    """Local mode keeps its newest ``keep`` checkpoints (Ray's CheckpointConfig does this for Ray runs)."""
    found = sorted(folder.glob("checkpoint_*"))
    for old in found[: max(0, len(found) - keep)]:
        shutil.rmtree(old, ignore_errors=True)


def train_loop(config: dict[str, Any]) -> None:
    """The training function of every Ray Train worker, and of ``--local``."""
    import ray.train
    import ray.train.torch

    from capenext.baselines import MeanPositionModel
    from capenext.checkpoint import atomic_save, load_weights, read_checkpoint, save_checkpoint
    from capenext.data import PairDataset, episodes, training_pairs
    from capenext.data.shards import ShardIndex
    from capenext.data.transforms import decode_image
    from capenext.engine import evaluate, train_one_epoch
    from capenext.losses import CapeNextLoss
    from capenext.models import build_model
    from pipelines.embed import load_bank

    job, cfg = config["job"], from_dict(config["run"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = torch.device("cpu")
    if job["use_gpu"]:
        device = torch.device("cuda") if job["local"] else ray.train.torch.get_device()
    torch.set_num_threads(job["threads"])
    seed = cfg.optim.seed
    torch.manual_seed(seed)
    np.random.seed(seed)
    if device.type == "cpu":
        torch.use_deterministic_algorithms(True, warn_only=True)

    index = ShardIndex(job["shards"])
    subsets = {name: index.subset(job["split"], name) for name in ("train", "val", "test")}

    def load_image(sample):
        return decode_image(index.read_bytes(sample), f"shard sample of annotation {sample.ann_id}")

    model = build_model(cfg.model).to(device)
    image_table = needs_image_table(cfg)
    bank = load_bank(job["embeddings"], images=image_table)

    def prepare(batch: dict) -> dict:
        return bank.fill(batch, cfg.data.max_keypoints, image_table, model.needs_class_embedding)

    criterion = CapeNextLoss(cfg.optim.heatmap_weight)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay)
    start_epoch, step, best = 0, 0, -1.0
    run_id = config["run_id"]
    resume = _restore(job)
    if resume is not None:
        load_weights(model, read_checkpoint(resume / CHECKPOINT_FILE)["model"], str(resume))
        state = torch.load(resume / STATE_FILE, map_location="cpu", weights_only=True)
        optimizer.load_state_dict(state["optimizer"])
        start_epoch, step, best, run_id = state["epoch"] + 1, state["step"], state["best"], state["run_id"]
        torch.set_rng_state(state["rng"])
        if rank == 0:
            print(f"resuming {job['run_name']} from {resume.name}: epoch {start_epoch}, step {step}", flush=True)
    ddp = ray.train.torch.prepare_model(model, move_to_device=False) if world > 1 else model
    tracker = Tracker(config["tracking_uri"], run_id, active=rank == 0)
    per_worker = cfg.optim.batch_size // world
    last_val = best

    def eval_loader(subset, num_episodes: int, ep_seed: int):
        pairs = episodes(subset.by_category(), num_episodes, cfg.data.queries, ep_seed)
        mine = np.arange(rank, len(pairs), world)
        ds = PairDataset(subset, pairs, cfg.data, load_image=load_image, positions=mine)
        return torch.utils.data.DataLoader(ds, batch_size=per_worker, collate_fn=_collate,
                                           num_workers=job["loader_workers"])

    for epoch in range(start_epoch, cfg.optim.epochs):
        t0 = time.time()
        pairs = training_pairs(subsets["train"].by_category(), seed, epoch)
        share = len(pairs) // world
        mine = np.arange(rank, share * world, world)
        ds = PairDataset(subsets["train"], pairs, cfg.data, train=True, seed=seed, load_image=load_image,
                         positions=mine)
        loader = torch.utils.data.DataLoader(ds, batch_size=per_worker, drop_last=True, collate_fn=_collate,
                                             num_workers=job["loader_workers"])
        first_step = step
        losses, step = train_one_epoch(
            ddp, criterion, loader, optimizer, device, prepare,
            lr_at_step=lambda s: cfg.optim.lr * lr_factor(s, epoch, cfg), start_step=step,
            max_steps=job["max_steps"],
        )
        elapsed = time.time() - t0
        metrics = {f"train/{k}": v for k, v in _all_mean(losses, device).items()}
        metrics["train/lr"] = cfg.optim.lr * lr_factor(step, epoch, cfg)
        metrics["train/img_per_s"] = (step - first_step) * cfg.optim.batch_size / max(elapsed, 1e-9)
        metrics["train/epoch_seconds"] = elapsed
        if (epoch + 1) % job["val_every"] == 0 or epoch + 1 == cfg.optim.epochs:
            val = evaluate(ddp, eval_loader(subsets["val"], cfg.data.val_episodes, seed + 1), device, prepare,
                           cfg.data.image_size, thresholds=(0.2,))
            last_val = val["pck_0.2"]
            metrics["val/pck_0.2"] = last_val
        tracker.metrics(metrics, step=epoch)
        report = {**metrics, "epoch": epoch, "step": step, "val/pck_0.2": last_val}
        with tempfile.TemporaryDirectory() as tmp:
            checkpoint = None
            if rank == 0:
                save_checkpoint(Path(tmp) / CHECKPOINT_FILE, model, cfg, {"run_id": run_id, "epoch": epoch})
                improved = last_val > best
                best = max(best, last_val)
                atomic_save({"optimizer": optimizer.state_dict(), "epoch": epoch, "step": step, "best": best,
                             "run_id": run_id, "rng": torch.get_rng_state()}, Path(tmp) / STATE_FILE)
                artifacts = Path(job["storage"]) / job["run_name"] / "artifacts"
                artifacts.mkdir(parents=True, exist_ok=True)
                if improved:
                    shutil.copy2(Path(tmp) / CHECKPOINT_FILE, artifacts / "best.pt")
                if job["local"]:
                    target = Path(job["storage"]) / job["run_name"] / "local" / f"checkpoint_{epoch:06d}"
                    shutil.copytree(tmp, target, dirs_exist_ok=True)
                    _local_keep(target.parent, job["keep"])
                checkpoint = ray.train.Checkpoint.from_directory(tmp)
                shown = f"{last_val:.3f}" if last_val >= 0 else "-"
                print(f"epoch {epoch + 1}/{cfg.optim.epochs}  loss {metrics.get('train/loss', float('nan')):.4f}  "
                      f"val pck@0.2 {shown}  {elapsed:.1f}s  {metrics['train/img_per_s']:.1f} img/s", flush=True)
            ray.train.report(report, checkpoint=checkpoint)

    test_loader = eval_loader(subsets["test"], cfg.data.test_episodes, seed + 2)
    test = evaluate(ddp, test_loader, device, prepare, cfg.data.image_size, thresholds=THRESHOLDS)
    floor = MeanPositionModel(subsets["train"], subsets["test"].categories, cfg.data)
    base = evaluate(floor, test_loader, device, lambda b: b, cfg.data.image_size, thresholds=THRESHOLDS)
    final = {f"test/{k}": v for k, v in test.items() if k != "count"}
    final.update({f"baseline/{k}": v for k, v in base.items() if k != "count"})
    final["test/queries"] = test["count"]
    tracker.metrics(final, step=cfg.optim.epochs)
    if rank == 0:
        artifacts = Path(job["storage"]) / job["run_name"] / "artifacts"
        artifacts.mkdir(parents=True, exist_ok=True)
        save_checkpoint(artifacts / "final.pt", model, cfg, {"run_id": run_id, "epoch": cfg.optim.epochs - 1,
                                                              **final})
        for name in ("final.pt", "best.pt"):
            if (artifacts / name).is_file():
                tracker.artifact(artifacts / name, "checkpoints")
        tracker.finish()
        print("test     " + "  ".join(f"{k[5:]} {v:.4f}" for k, v in final.items() if k.startswith("test/pck")),
              flush=True)
        print("baseline " + "  ".join(f"{k[9:]} {v:.4f}" for k, v in final.items() if k.startswith("baseline/")),
              flush=True)
    ray.train.report(final, checkpoint=None)


# --- driver ------------------------------------------------------------------------------------------


def run(args: argparse.Namespace, cfg: RunCfg, run_name: str) -> dict[str, float]:
    """Pre-flight, MLflow run, then the TorchTrainer (or local mode); returns the final metrics."""
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    job = preflight(args, cfg, run_name)
    job["tracking_uri"] = tracking_uri()
    resume = latest_checkpoint(Path(job["storage"]), run_name)
    if not args.local:
        if not ray.is_initialized():
            ray.init(address=args.address, log_to_driver=True)
        check_cluster(args)
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

    logged = MlflowClient(job["tracking_uri"]).get_run(run_id).data.metrics
    return {k: v for k, v in sorted(logged.items()) if k.startswith(("test/", "baseline/"))}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cfg = resolve_config(args)
    run_name = args.run_name or f"split{args.split}-{cfg.model.ablation}-{cfg.model.backbone}"
    metrics = run(args, cfg, run_name)
    print(json.dumps({"run_name": run_name, **metrics}))
    return 0


if __name__ == "__main__":
    run_main(main)
