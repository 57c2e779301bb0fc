"""Embedding benchmark: ``python -m jobs.benchmark embed``.

Images per second of the embedding job's image path (Ray Data: read the shards, decode, crop, CLIP
image tower on the actor pool, collect) against a bare CLIP image forward on the same device, batch
size and number of CPU threads, over the same number of images, measured in one run. The ratio is what
the pipeline keeps of the model's own speed; the goal is ≥ 0.5 on a GPU. The actor pool is the embedding
job's (:func:`pipelines.clip_tables.plan_actors`): ``--device`` and its default as ``pipelines.embed``'s.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from capenext.config import RunCfg, resolve
from capenext.data.shards import ShardIndex
from jobs.benchmarks import machine
from pipelines.clip_tables import DEVICE_HELP, ActorPlan, clip_of, image_table, plan_actors
from jobs.runtime.cluster import init_ray
from capenext.options import add_address, add_device, positive


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--shards", type=Path, default=None,
                        help="shard folder (default: the synthetic set, generated and sharded into a temp dir)")
    parser.add_argument("--clip-model", default="ViT-B-32", help="open_clip model (default ViT-B-32)")
    parser.add_argument("--clip-checkpoint", required=True,
                        help="local CLIP weights, or 'random' (speed does not depend on the weights; required, so "
                             "that a random CLIP is never used without saying so, as in pipelines.embed)")
    parser.add_argument("--encode-batch-size", type=int, default=64,
                        help="images per CLIP forward (default 64), as pipelines.embed's")
    parser.add_argument("--image-size", type=int, default=256, help="training crop side (default 256)")
    add_device(parser, default=None, help=DEVICE_HELP)
    add_address(parser)


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
    positive("--encode-batch-size", args.encode_batch_size)
    cfg = resolve(None, {"model.clip_model": args.clip_model, "model.clip_checkpoint": args.clip_checkpoint,
                         "data.image_size": args.image_size}, [])
    init_ray(args.address)
    plan = plan_actors(args.device)  # before any work: --device cuda without a GPU is one line
    with contextlib.ExitStack() as stack:
        index = ShardIndex(_shards(args, stack))
        n = len(index.samples)
        t0 = time.perf_counter()
        table = image_table(index, cfg, args.encode_batch_size, plan)
        job_s = time.perf_counter() - t0
        if table.num_rows != n:
            raise RuntimeError(f"the embedding job returned {table.num_rows} rows for {n} images")
        bare_s = bare_forward(cfg, plan, args.encode_batch_size, n)
    job_ips, bare_ips = n / job_s, n / bare_s
    return {
        "benchmark": "embed", "machine": machine(), "device": plan.device, "clip_model": args.clip_model,
        "images": n, "encode_batch_size": args.encode_batch_size, "actors": plan.actors,
        "embed_job_img_per_s": round(job_ips, 2), "bare_clip_img_per_s": round(bare_ips, 2),
        "ratio": round(job_ips / bare_ips, 3),
        "note": "the job's time includes Ray Data start-up, actor start-up (CLIP build) and the shard read",
        "goal_ratio_gpu": 0.5,
    }
