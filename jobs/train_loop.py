"""The training function of every Ray Train worker (and of ``jobs.train --local``, in-process).

Per epoch: class-balanced pairs drawn from ``(seed, epoch)``, each worker an equal strided share (the
remainder dropped, so every worker runs the same number of steps), augmentation seeded by
``(seed, epoch, global pair index)``; the reference's schedule (:func:`capenext.engine.lr_factor`);
validation PCK@0.2 every ``val_every`` epochs; a checkpoint reported every epoch. At the end: test PCK at
every threshold and the per-name mean-position floor on the same episodes. Rank 0 logs through a
:class:`~jobs.tracking.Tracker`; an epoch already in the run's history (a worker group restarted after
logging it) is not logged again.
"""

from __future__ import annotations

import logging
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from capenext.cli import offline
from capenext.config import from_dict
from capenext.metrics import FLOOR, THRESHOLDS, VAL_THRESHOLDS, episode_seed
from jobs.common import collate
from jobs.runs import CHECKPOINT_FILE, STATE_FILE, latest_checkpoint, needs_image_table, write_progress
from jobs.tracking import Tracker


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


def _restore(job: dict[str, Any]) -> Path | None:
    """Where to resume from: Ray's restored checkpoint, else the newest one of this run on disk (local
    mode keeps its own; a Ray worker group restarted before Ray registered the last report finds it there,
    passing over a folder whose upload the restart cut short)."""
    import ray.train

    ckpt = ray.train.get_checkpoint()
    if ckpt is not None:
        return Path(ckpt.path)
    return latest_checkpoint(Path(job["storage"]), job["run_name"], complete_only=True)


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


def train_loop(config: dict[str, Any]) -> None:
    import ray.train
    import ray.train.torch

    from capenext.baselines import MeanPositionModel
    from capenext.checkpoint import atomic_save, load_weights, read_checkpoint, save_checkpoint
    from capenext.data import PairDataset, episodes
    from capenext.data.embeddings import load_bank
    from capenext.data.shards import ShardIndex
    from capenext.engine import evaluate, lr_factor, make_optimizer, train_one_epoch
    from capenext.losses import CapeNextLoss
    from capenext.models import build_model

    offline()
    _quiet_ray_train()
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

    index = ShardIndex(job["shards"], descriptions=cfg.data.descriptions, text_variant=cfg.data.text_variant)
    subsets = {name: index.subset(job["split"], name) for name in ("train", "val", "test")}

    def load_image(sample):  # the encoded bytes: make_item decodes them (reduced when data.reduced_decode)
        return index.read_bytes(sample)

    model = build_model(cfg.model).to(device)
    image_table = needs_image_table(cfg)
    bank = load_bank(job["embeddings"], images=image_table)

    masked = [0]  # support keypoints the reference's rule zeroed after augmentation, this epoch

    def prepare(batch: dict) -> dict:
        if model.training and "support_masked" in batch:
            masked[0] += int(batch["support_masked"].sum())
        return bank.fill(batch, cfg.data.max_keypoints, image_table, model.needs_class_embedding)

    criterion = CapeNextLoss(cfg.optim.heatmap_weight)

    def run_frozen(module, _inputs) -> None:  # a frozen part runs as at inference (norm statistics fixed)
        module.eval()

    for part in filter(None, job.get("freeze", "").split(",")):  # no gradient, left out of the optimiser
        getattr(model, part).requires_grad_(False)
        getattr(model, part).register_forward_pre_hook(run_frozen)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(params, cfg.optim)
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
            say(f"resuming {job['run_name']} from {resume.name}: epoch {start_epoch}, step {step}")
    elif job.get("init_checkpoint"):  # fine-tuning: the weights only; optimiser and schedule start afresh
        load_weights(model, read_checkpoint(job["init_checkpoint"])["model"], job["init_checkpoint"])
        if rank == 0:
            say(f"starting {job['run_name']} from the weights of {job['init_source']}")
    ddp = ray.train.torch.prepare_model(model, move_to_device=False) if world > 1 else model
    tracker = Tracker(config["tracking_uri"], run_id, active=rank == 0)
    logged = set(tracker.history("train/loss"))
    per_worker = cfg.optim.batch_size // world
    last_val = best

    def eval_loader(subset, num_episodes: int, ep_seed: int):
        pairs = episodes(subset.by_category(), num_episodes, cfg.data.queries, ep_seed)
        mine = np.arange(rank, len(pairs), world)
        ds = PairDataset(subset, pairs, cfg.data, load_image=load_image, positions=mine)
        return torch.utils.data.DataLoader(ds, batch_size=per_worker, collate_fn=collate,
                                           num_workers=job["loader_workers"])

    for epoch in range(start_epoch, cfg.optim.epochs):
        t0 = time.time()
        ds = epoch_dataset(subsets["train"], cfg.data, seed, epoch, rank, world, load_image)
        loader = torch.utils.data.DataLoader(ds, batch_size=per_worker, drop_last=True, collate_fn=collate,
                                             num_workers=job["loader_workers"])
        first_step, masked[0] = step, 0
        losses, step = train_one_epoch(
            ddp, criterion, loader, optimizer, device, prepare,
            lr_at_step=lambda s: cfg.optim.lr * lr_factor(s, epoch, cfg.optim), start_step=step,
            max_steps=job["max_steps"],
        )
        elapsed = time.time() - t0
        metrics = {f"train/{k}": v for k, v in _all_mean(losses, device).items()}
        metrics["train/lr"] = cfg.optim.lr * lr_factor(step, epoch, cfg.optim)
        metrics["train/img_per_s"] = (step - first_step) * cfg.optim.batch_size / max(elapsed, 1e-9)
        metrics["train/epoch_seconds"] = elapsed
        metrics["train/support_masked"] = _all_mean({"n": float(masked[0])}, device)["n"] * world
        if (epoch + 1) % job["val_every"] == 0 or epoch + 1 == cfg.optim.epochs:
            val = evaluate(ddp, eval_loader(subsets["val"], cfg.data.val_episodes, episode_seed(seed, "val")),
                           device, prepare, cfg.data.image_size, thresholds=VAL_THRESHOLDS)
            last_val = val["pck_0.2"]
            metrics["val/pck_0.2"] = last_val
        if epoch not in logged:
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
                write_progress(Path(tmp), {"epoch": epoch, "step": step, "best": best, "run_id": run_id})
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
                say(f"epoch {epoch + 1}/{cfg.optim.epochs}  loss {metrics.get('train/loss', float('nan')):.4f}  "
                    f"val pck@0.2 {shown}  {elapsed:.1f}s  {metrics['train/img_per_s']:.1f} img/s  "
                    f"support keypoints masked {metrics['train/support_masked']:.0f}")
            ray.train.report(report, checkpoint=checkpoint)

    test_loader = eval_loader(subsets["test"], cfg.data.test_episodes, episode_seed(seed, "test"))
    test = evaluate(ddp, test_loader, device, prepare, cfg.data.image_size, thresholds=THRESHOLDS)
    floor = MeanPositionModel(subsets["train"], subsets["test"].categories, cfg.data)
    base = evaluate(floor, test_loader, device, lambda b: b, cfg.data.image_size, thresholds=THRESHOLDS)
    final = {f"test/{k}": v for k, v in test.items() if k != "count"}
    final.update({f"{FLOOR}/{k}": v for k, v in base.items() if k != "count"})
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
        say("test     " + "  ".join(f"{k[5:]} {v:.4f}" for k, v in final.items() if k.startswith("test/pck")))
        say("floor    " + "  ".join(f"{k[len(FLOOR) + 1:]} {v:.4f}" for k, v in final.items()
                                    if k.startswith(f"{FLOOR}/")))
    ray.train.report(final, checkpoint=None)
