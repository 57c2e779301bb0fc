"""The training function of every Ray Train worker (and of ``jobs.train --local``, in-process).

Per epoch: class-balanced pairs drawn from ``(seed, epoch)``, each worker an equal strided share (the
remainder dropped, so every worker runs the same number of steps), augmentation seeded by
``(seed, epoch, global pair index)``; the reference's schedule (:func:`capenext.engine.lr_factor`);
validation PCK@0.2 every ``val_every`` epochs; a checkpoint reported every epoch. At the end: test PCK at
every threshold and the per-name mean-position floor on the same episodes, both through the one test
protocol (:func:`capenext.protocol.run_protocol`). Rank 0 logs through a
:class:`~jobs.runtime.tracking.Tracker`; an epoch already in the run's history (a worker group
restarted after logging it) is not logged again.
"""

from __future__ import annotations

import logging
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from capenext.checkpoint import (CHECKPOINT_FILE, STATE_FILE, artifacts_dir, atomic_copy, atomic_save,
                                 latest_checkpoint, load_weights, read_checkpoint, run_dir, save_checkpoint,
                                 write_progress)
from capenext.cli import offline
from capenext.data import collate
from capenext.metrics import FLOOR, THRESHOLDS, VAL_THRESHOLDS, episode_seed
from capenext.protocol import our_pairs, reference_pairs, run_protocol
from jobs.training.spec import TrainRun
from jobs.runtime.tracking import Tracker


def say(line: str) -> None:
    """One progress line on the worker's stdout, which Ray forwards to the driver once. (Ray Train patches
    ``print`` in its workers to go through the root logger, which with a wrapped stdout prints each line
    twice.)"""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def _quiet_ray_train() -> None:
    """Keep Ray Train's per-report INFO records ("Reporting training result ...", "Checkpoint successfully
    created ...") and libraries' INFO chatter (open_clip's tokenizer lookup) out of the progress."""
    for name in ("", "ray.train", "ray.data", "open_clip"):
        logging.getLogger(name).setLevel(logging.WARNING)


def _all_mean(values: dict[str, float], device: torch.device) -> dict[str, float]:
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or not values:
        return values
    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return dict(zip(keys, (t / dist.get_world_size()).tolist()))


def _restore(run: TrainRun) -> Path | None:
    """Where to resume from: Ray's restored checkpoint, else the newest one of this run on disk (local
    mode keeps its own; a Ray worker group restarted before Ray registered the last report finds it there,
    passing over a folder whose upload the restart cut short)."""
    import ray.train

    ckpt = ray.train.get_checkpoint()
    if ckpt is not None:
        return Path(ckpt.path)
    return latest_checkpoint(run.storage, run.run_name, complete_only=True)


def _local_keep(folder: Path, keep: int) -> None:
    """Local mode keeps its newest ``keep`` checkpoints (Ray's CheckpointConfig does this for Ray runs)."""
    found = sorted(folder.glob("checkpoint_*"))
    for old in found[: max(0, len(found) - keep)]:
        shutil.rmtree(old, ignore_errors=True)


def epoch_dataset(subset, data_cfg, seed: int, epoch: int, rank: int, world: int, load_image):
    """The epoch's training pairs for this worker: class-balanced pairs of ``(seed, epoch)``, an equal
    strided share of them, augmentation seeded by ``(seed, epoch, global pair index)``."""
    from capenext.data import PairDataset, training_pairs

    pairs = training_pairs(subset.by_category(), seed, epoch)
    share = len(pairs) // world
    mine = np.arange(rank, share * world, world)
    ds = PairDataset(subset, pairs, data_cfg, train=True, seed=seed, load_image=load_image, positions=mine)
    ds.set_epoch(epoch)
    return ds


@dataclass
class Worker:
    """What one worker holds for the run: its rank, device, data, model, optimiser and progress."""

    run: TrainRun
    run_id: str
    rank: int
    world: int
    device: torch.device
    index: Any  # ShardIndex
    subsets: dict[str, Any]
    bank: Any  # EmbeddingBank
    model: torch.nn.Module
    ddp: torch.nn.Module
    optimizer: torch.optim.Optimizer
    start_epoch: int = 0
    step: int = 0
    best: float = -1.0
    image_table: bool = False  # the batches read the image-embedding table (needs_image_table of the config)
    masked: list[int] = field(default_factory=lambda: [0])  # support keypoints zeroed by augmentation, this epoch

    @property
    def per_worker(self) -> int:
        return self.run.cfg.optim.batch_size // self.world

    def load_image(self, sample):  # the encoded bytes: make_item decodes them (reduced when data.reduced_decode)
        return self.index.read_bytes(sample)

    def prepare(self, batch: dict) -> dict:
        """A training batch's embeddings (and the count of support keypoints augmentation masked)."""
        if "support_masked" in batch:
            self.masked[0] += int(batch["support_masked"].sum())
        return self.bank.fill(batch, self.run.cfg.data.max_keypoints, self.image_table,
                              self.model.needs_class_embedding)

    def pairs(self, subset: str, num_episodes: int):
        """The subset's episodes: ours, seeded by the run; the test's the reference's when the config says
        so (``data.episodes=reference``, the paper recipe's: its sampler on the split's test annotation file)."""
        cfg = self.run.cfg
        if subset == "test" and cfg.data.episodes == "reference":
            return reference_pairs(self.run.data_root, self.run.split, self.index, self.subsets[subset], num_episodes,
                                   cfg.data.queries)
        return our_pairs(self.subsets[subset], num_episodes, cfg.data.queries, episode_seed(cfg.optim.seed, subset))

    def protocol(self, model, subset: str, num_episodes: int, thresholds, bank=True) -> dict[str, float]:
        """The test protocol on this worker's share of the subset's episodes."""
        cfg = self.run.cfg
        pairs = self.pairs(subset, num_episodes)
        metrics, _ = run_protocol(model, self.subsets[subset], pairs, cfg.data, self.device,
                                  load_image=self.load_image, batch_size=self.per_worker,
                                  bank=self.bank if bank else None, thresholds=thresholds, rank=self.rank,
                                  world=self.world, loader_workers=self.run.loader_workers)
        return metrics


def setup(config: dict[str, Any]) -> Worker:
    """The worker's state: data, model (resumed, or fine-tuning from the init weights), optimiser."""
    import ray.train
    import ray.train.torch

    from capenext.data.embeddings import load_bank, needs_image_table
    from capenext.data.shards import ShardIndex
    from capenext.engine import make_optimizer
    from capenext.models import build_model

    run: TrainRun = config["run"]
    cfg = run.cfg
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = torch.device("cpu")
    if run.device == "cuda":
        device = torch.device("cuda") if run.local else ray.train.torch.get_device()
    torch.set_num_threads(run.threads)
    torch.manual_seed(cfg.optim.seed)
    np.random.seed(cfg.optim.seed)
    if device.type == "cpu":
        torch.use_deterministic_algorithms(True, warn_only=True)
    index = ShardIndex(run.shards, descriptions=cfg.data.descriptions, text_variant=cfg.data.text_variant)
    subsets = {name: index.subset(run.split, name) for name in ("train", "val", "test")}
    model = build_model(cfg.model).to(device)
    if run.sync_batchnorm and world > 1:  # BatchNorm statistics over the global batch, as the reference's one GPU
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    bank = load_bank(run.embeddings, images=needs_image_table(cfg))

    def run_frozen(module, _inputs) -> None:  # a frozen part runs as at inference (norm statistics fixed)
        module.eval()

    for part in run.freeze:  # no gradient, left out of the optimiser
        getattr(model, part).requires_grad_(False)
        getattr(model, part).register_forward_pre_hook(run_frozen)
    optimizer = make_optimizer([p for p in model.parameters() if p.requires_grad], cfg.optim)
    w = Worker(run, config["run_id"], rank, world, device, index, subsets, bank, model, model, optimizer,
               image_table=needs_image_table(cfg))
    resume = _restore(run)
    if resume is not None:
        load_weights(model, read_checkpoint(resume / CHECKPOINT_FILE)["model"], str(resume))
        state = torch.load(resume / STATE_FILE, map_location="cpu", weights_only=True)
        optimizer.load_state_dict(state["optimizer"])
        w.start_epoch, w.step, w.best, w.run_id = state["epoch"] + 1, state["step"], state["best"], state["run_id"]
        torch.set_rng_state(state["rng"])
        if rank == 0:
            say(f"resuming {run.run_name} from {resume.name}: epoch {w.start_epoch}, step {w.step}")
    elif run.init is not None:  # fine-tuning: the weights only; optimiser and schedule start afresh
        load_weights(model, read_checkpoint(run.init.path)["model"], run.init.path)
        if rank == 0:
            say(f"starting {run.run_name} from the weights of {run.init.source}")
    w.ddp = ray.train.torch.prepare_model(model, move_to_device=False) if world > 1 else model
    return w


def train_epoch(w: Worker, epoch: int) -> dict[str, float]:
    """One epoch's steps and, when due, validation; the epoch's metrics."""
    from capenext.engine import lr_factor, train_one_epoch
    from capenext.losses import CapeNextLoss

    cfg, t0 = w.run.cfg, time.time()
    ds = epoch_dataset(w.subsets["train"], cfg.data, cfg.optim.seed, epoch, w.rank, w.world, w.load_image)
    loader = torch.utils.data.DataLoader(ds, batch_size=w.per_worker, drop_last=True, collate_fn=collate,
                                         num_workers=w.run.loader_workers)
    first_step, w.masked[0] = w.step, 0
    losses, w.step = train_one_epoch(
        w.ddp, CapeNextLoss(cfg.optim.heatmap_weight), loader, w.optimizer, w.device, w.prepare,
        lr_at_step=lambda s: cfg.optim.lr * lr_factor(s, epoch, cfg.optim), start_step=w.step,
        max_steps=w.run.max_steps,
    )
    elapsed = time.time() - t0
    metrics = {f"train/{k}": v for k, v in _all_mean(losses, w.device).items()}
    metrics["train/lr"] = cfg.optim.lr * lr_factor(w.step, epoch, cfg.optim)
    metrics["train/img_per_s"] = (w.step - first_step) * cfg.optim.batch_size / max(elapsed, 1e-9)
    metrics["train/epoch_seconds"] = elapsed
    metrics["train/support_masked"] = _all_mean({"n": float(w.masked[0])}, w.device)["n"] * w.world
    if (epoch + 1) % w.run.val_every == 0 or epoch + 1 == cfg.optim.epochs:
        metrics["val/pck_0.2"] = w.protocol(w.ddp, "val", cfg.data.val_episodes, VAL_THRESHOLDS)["pck_0.2"]
    return metrics


def save_epoch(w: Worker, epoch: int, metrics: dict[str, float], last_val: float) -> None:
    """Rank 0 writes the epoch's checkpoint folder (weights, state, progress last), ``best.pt`` when val
    improved, and the local-mode copy; every rank reports (Ray needs the same number of reports)."""
    import ray.train

    run, cfg = w.run, w.run.cfg
    report = {**metrics, "epoch": epoch, "step": w.step, "val/pck_0.2": last_val}
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = None
        if w.rank == 0:
            folder = Path(tmp)
            save_checkpoint(folder / CHECKPOINT_FILE, w.model, cfg, {"run_id": w.run_id, "epoch": epoch})
            improved = last_val > w.best
            w.best = max(w.best, last_val)
            atomic_save({"optimizer": w.optimizer.state_dict(), "epoch": epoch, "step": w.step, "best": w.best,
                         "run_id": w.run_id, "rng": torch.get_rng_state()}, folder / STATE_FILE)
            write_progress(folder, {"epoch": epoch, "step": w.step, "best": w.best, "run_id": w.run_id})
            artifacts = artifacts_dir(run.storage, run.run_name)
            artifacts.mkdir(parents=True, exist_ok=True)
            if improved:
                atomic_copy(folder / CHECKPOINT_FILE, artifacts / "best.pt")
            if run.local:
                target = run_dir(run.storage, run.run_name) / "local" / f"checkpoint_{epoch:06d}"
                shutil.copytree(tmp, target, dirs_exist_ok=True)
                _local_keep(target.parent, run.keep_checkpoints)
            checkpoint = ray.train.Checkpoint.from_directory(tmp)
            shown = f"{last_val:.3f}" if last_val >= 0 else "-"
            say(f"epoch {epoch + 1}/{cfg.optim.epochs}  loss {metrics.get('train/loss', float('nan')):.4f}  "
                f"val pck@0.2 {shown}  {metrics['train/epoch_seconds']:.1f}s  {metrics['train/img_per_s']:.1f} "
                f"img/s  support keypoints masked {metrics['train/support_masked']:.0f}")
        ray.train.report(report, checkpoint=checkpoint)


def final_test(w: Worker, tracker: Tracker) -> dict[str, float]:
    """Test PCK and the per-name mean-position floor on the test episodes; rank 0 saves ``final.pt``."""
    from capenext.baselines import MeanPositionModel

    run, cfg = w.run, w.run.cfg
    test = w.protocol(w.ddp, "test", cfg.data.test_episodes, THRESHOLDS)
    floor = MeanPositionModel(w.subsets["train"], w.subsets["test"].categories, cfg.data)
    base = w.protocol(floor, "test", cfg.data.test_episodes, THRESHOLDS, bank=False)
    final = {f"test/{k}": v for k, v in test.items() if k != "count"}
    final.update({f"{FLOOR}/{k}": v for k, v in base.items() if k != "count"})
    final["test/queries"] = test["count"]
    tracker.metrics(final, step=cfg.optim.epochs)
    if w.rank == 0:
        artifacts = artifacts_dir(run.storage, run.run_name)
        artifacts.mkdir(parents=True, exist_ok=True)
        save_checkpoint(artifacts / "final.pt", w.model, cfg, {"run_id": w.run_id, "epoch": cfg.optim.epochs - 1,
                                                                **final})
        for name in ("final.pt", "best.pt"):
            if (artifacts / name).is_file():
                tracker.artifact(artifacts / name, "checkpoints")
        tracker.finish()
        say("test     " + "  ".join(f"{k[5:]} {v:.4f}" for k, v in final.items() if k.startswith("test/pck")))
        say("floor    " + "  ".join(f"{k[len(FLOOR) + 1:]} {v:.4f}" for k, v in final.items()
                                    if k.startswith(f"{FLOOR}/")))
    return final


def train_loop(config: dict[str, Any]) -> None:
    """``config``: ``{"run": TrainRun, "run_id": MLflow run id}`` (what :mod:`jobs.training.driver` passes)."""
    import ray.train

    offline()
    _quiet_ray_train()
    w = setup(config)
    tracker = Tracker(w.run.tracking_uri, w.run_id, active=w.rank == 0)
    logged = set(tracker.history("train/loss"))
    last_val = w.best
    for epoch in range(w.start_epoch, w.run.cfg.optim.epochs):
        metrics = train_epoch(w, epoch)
        last_val = metrics.get("val/pck_0.2", last_val)
        if epoch not in logged:
            tracker.metrics(metrics, step=epoch)
        save_epoch(w, epoch, metrics, last_val)
    final = final_test(w, tracker)
    ray.train.report(final, checkpoint=None)
