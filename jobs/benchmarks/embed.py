"""Embedding benchmark: ``python -m jobs.benchmark embed``.

Images per second of the embedding job's image path (Ray Data: read the shards, decode, crop, CLIP
image tower on the actor pool, collect) against a bare CLIP image forward on the same device, batch
size and number of CPU threads, over the same number of images, measured in one run. The ratio is what
the pipeline keeps of the model's own speed; the goal is ≥ 0.5 on a GPU. The actor pool is the embedding
job's (:func:`pipelines.clip_tables.plan_actors`): ``--device`` and its default as ``pipelines.embed``'s.

``--images N`` measures the first shards of the manifest holding at least ``N`` images (whole shards: the job
reads shard files), both sides over those images. ``--quick`` is the tests' smoke run: the tiny CLIP, a
128 px crop, 64 images, 16 per forward (a few forwards on each side); with ``--shards`` it makes no data.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from capenext.config import RunCfg, resolve
from capenext.data.shards import ShardIndex
from capenext.options import add_address, add_device, positive
from jobs.benchmarks import machine, sizes
from jobs.runtime.cluster import init_ray
from pipelines.clip_tables import (
    DEVICE_HELP,
    ActorPlan,
    clip_of,
    image_table,
    plan_actors,
)

FULL = {"clip_model": "ViT-B-32", "image_size": 256, "encode_batch_size": 64, "images": None}
QUICK = {"clip_model": "tiny", "image_size": 128, "encode_batch_size": 16, "images": 64}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--shards", type=Path, default=None,
                        help="shard folder (default: the synthetic set, generated and sharded into a temp dir)")
    parser.add_argument("--clip-model", default=None,
                        help=f"open_clip model (default {FULL['clip_model']}; quick {QUICK['clip_model']})")
    parser.add_argument("--clip-checkpoint", required=True,
                        help="local CLIP weights, or 'random' (speed does not depend on the weights; required, so "
                             "that a random CLIP is never used without saying so, as in pipelines.embed)")
    parser.add_argument("--encode-batch-size", type=int, default=None,
                        help=f"images per CLIP forward, as pipelines.embed's (default {FULL['encode_batch_size']}; "
                             f"quick {QUICK['encode_batch_size']})")
    parser.add_argument("--image-size", type=int, default=None,
                        help=f"training crop side (default {FULL['image_size']}; quick {QUICK['image_size']})")
    parser.add_argument("--images", type=int, default=None,
                        help="measure the first shards holding at least this many images (default all; quick "
                             f"{QUICK['images']})")
    parser.add_argument("--quick", action="store_true",
                        help="the tests' smoke run: tiny CLIP, 128 px, 64 images, 16 per forward")
    add_device(parser, default=None, help=DEVICE_HELP)
    add_address(parser)


def _sizes(args: argparse.Namespace) -> dict[str, Any]:
    """The flags given, else the quick or full defaults; one line for a count below 1."""
    chosen = sizes(args, QUICK, FULL)
    for key in ("encode_batch_size", "image_size", "images"):
        positive("--" + key.replace("_", "-"), chosen[key])
    return chosen


def first_shards(index: ShardIndex, images: int | None) -> ShardIndex:
    """``index`` cut to the first shards of its manifest that hold at least ``images`` samples (all when
    ``None`` or when it has fewer): the same shard files, so the job reads exactly those."""
    if images is None or images >= len(index):
        return index
    shards, n = [], 0
    for entry in index.manifest["shards"]:
        shards.append(entry)
        n += entry["count"]
        if n >= images:
            break
    cut = copy.copy(index)
    cut.manifest = {**index.manifest, "shards": shards}
    cut.samples = index.samples[:n]  # samples are in shard order
    return cut


def _shards(args: argparse.Namespace, stack: contextlib.ExitStack) -> Path:
    """``--shards``, or the synthetic set generated and sharded into a temporary folder."""
    if args.shards is not None:
        return args.shards
    from pipelines import shard
    from pipelines.synthetic import generate

    work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench_embed_")))
    generate(work / "data", seed=0, progress=False)
    shard.run(work / "data", work / "shards", progress=False)
    return work / "shards"


def bare_forward(cfg: RunCfg, plan: ActorPlan, batch_size: int, n: int) -> float:
    """Seconds of ``n`` images through the bare CLIP image tower in this process, on the actors' device
    and, on CPU, the actors' threads (one each: OMP_NUM_THREADS in Ray workers)."""
    device = torch.device(plan.device)
    clip = clip_of(cfg).to(device)
    threads = torch.get_num_threads()
    if plan.device == "cpu":
        torch.set_num_threads(plan.actors * int(os.environ.get("OMP_NUM_THREADS", "1")))
    try:
        x = torch.randn(batch_size, 3, cfg.data.image_size, cfg.data.image_size, device=device)
        clip.encode_image(x[:2])  # warm-up
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for done in range(0, n, batch_size):
            clip.encode_image(x[: min(batch_size, n - done)])
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0
    finally:
        torch.set_num_threads(threads)


def run(args: argparse.Namespace) -> dict[str, Any]:
    sizes = _sizes(args)
    batch = sizes["encode_batch_size"]
    cfg = resolve(None, {"model.clip_model": sizes["clip_model"], "model.clip_checkpoint": args.clip_checkpoint,
                         "data.image_size": sizes["image_size"]}, [])
    init_ray(args.address)
    plan = plan_actors(args.device)  # before any work: --device cuda without a GPU is one line
    with contextlib.ExitStack() as stack:
        index = first_shards(ShardIndex(_shards(args, stack)), sizes["images"])
        n = len(index.samples)
        t0 = time.perf_counter()
        table = image_table(index, cfg, batch, plan)
        job_s = time.perf_counter() - t0
        if table.num_rows != n:
            raise RuntimeError(f"the embedding job returned {table.num_rows} rows for {n} images")
        bare_s = bare_forward(cfg, plan, batch, n)
    job_ips, bare_ips = n / job_s, n / bare_s
    return {
        "benchmark": "embed", "machine": machine(), "device": plan.device, "clip_model": sizes["clip_model"],
        "image_size": sizes["image_size"], "images": n, "shards": len(index.shard_paths),
        "encode_batch_size": batch, "actors": plan.actors,
        "embed_job_img_per_s": round(job_ips, 2), "bare_clip_img_per_s": round(bare_ips, 2),
        "ratio": float(f"{job_ips / bare_ips:.3g}"),  # 3 significant digits: a quick run's is tiny, not 0
        "note": "the job's time includes Ray Data start-up, actor start-up (CLIP build) and the shard read",
        "goal_ratio_gpu": 0.5, "quick": bool(args.quick),
    }
