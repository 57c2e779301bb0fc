"""Embedding benchmark: ``python -m jobs.benchmark embed``.

Images per second of the embedding job's image path (Ray Data: read the shards, decode, crop, CLIP
image tower on the actor pool, collect) against a bare CLIP image forward on the same device, batch
size and number of CPU threads, over the same number of images, measured in one run. The ratio is what
the pipeline keeps of the model's own speed; the goal is ≥ 0.5 on a GPU.
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


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--shards", type=Path, default=None,
                        help="shard folder (default: the synthetic set, generated and sharded into a temp dir)")
    parser.add_argument("--clip-model", default="ViT-B-32", help="open_clip model (default ViT-B-32)")
    parser.add_argument("--clip-checkpoint", required=True,
                        help="local CLIP weights, or 'random' (speed does not depend on the weights; required, so "
                             "that a random CLIP is never used without saying so, as in pipelines.embed)")
    parser.add_argument("--batch-size", type=int, default=64, help="images per CLIP forward (default 64)")
    parser.add_argument("--image-size", type=int, default=256, help="training crop side (default 256)")


def run(args: argparse.Namespace) -> dict[str, Any]:
    import ray

    from capenext.data.shards import ShardIndex
    from capenext.config import resolve
    from jobs.common import init_ray, machine
    from pipelines.embed import clip_of, image_table
    from pipelines.shard import shard

    cfg = resolve(None, {"model.clip_model": args.clip_model, "model.clip_checkpoint": args.clip_checkpoint,
                         "data.image_size": args.image_size}, [])
    with contextlib.ExitStack() as stack:
        shards = args.shards
        if shards is None:
            from pipelines.synthetic import generate

            work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench_embed_")))
            generate(work / "data", seed=0, progress=False)
            shards = work / "shards"
            shard(work / "data", shards, progress=False)
        index = ShardIndex(shards)
        n = len(index.samples)
        init_ray()
        resources = ray.cluster_resources()
        use_gpu = resources.get("GPU", 0) > 0
        actors = int(resources["GPU"]) if use_gpu else max(1, int(resources.get("CPU", 1)) - 1)
        device = torch.device("cuda" if use_gpu else "cpu")

        t0 = time.perf_counter()
        table = image_table(index, cfg, args.batch_size, actors, use_gpu)
        job_s = time.perf_counter() - t0
        assert table.num_rows == n

        clip = clip_of(cfg).to(device)
        threads = torch.get_num_threads()
        if not use_gpu:  # the same CPU budget as the actors: one thread each (OMP_NUM_THREADS in Ray workers)
            torch.set_num_threads(actors * int(os.environ.get("OMP_NUM_THREADS", "1")))
        x = torch.randn(args.batch_size, 3, args.image_size, args.image_size, device=device)
        clip.encode_image(x[:2])  # warm-up
        if use_gpu:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        done = 0
        while done < n:
            clip.encode_image(x[: min(args.batch_size, n - done)])
            done += min(args.batch_size, n - done)
        if use_gpu:
            torch.cuda.synchronize()
        bare_s = time.perf_counter() - t0
        torch.set_num_threads(threads)
    job_ips, bare_ips = n / job_s, n / bare_s
    return {
        "benchmark": "embed", "machine": machine(), "device": str(device), "clip_model": args.clip_model,
        "images": n, "batch_size": args.batch_size, "actors": actors,
        "embed_job_img_per_s": round(job_ips, 2), "bare_clip_img_per_s": round(bare_ips, 2),
        "ratio": round(job_ips / bare_ips, 3),
        "note": "the job's time includes Ray Data start-up, actor start-up (CLIP build) and the shard read",
        "goal_ratio_gpu": 0.5,
    }
