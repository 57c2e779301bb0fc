"""Serving benchmark: ``python -m jobs.benchmark serve``.

Requests per second and p50 / p95 latency of ``POST /v1/predict`` on a real Ray Serve (``jobs.serve``'s
application, one replica) at concurrency 1, 8 and 32, with request batching on (``--max-batch-size``,
default 16) and off (max batch size 1), measured in one run against the same replica: batching is the
deployment's ``user_config``, so switching it reconfigures the replica in place and the model stays loaded.
The ratio is requests/s with batching over requests/s without, per concurrency; the goal is ≥ 2 at
concurrency 32 on CPU.

Each request is one multipart upload of the same photo-like JPEG (``--image-size``, 640x480) with
``--keypoints`` names, a class, a skeleton and a box, answered with the JSON points. The client is one
asyncio loop in this process holding ``concurrency`` requests in flight, ``--requests`` per level; it only
ever connects to 127.0.0.1. Levels run in interleaved ``--rounds`` (batching on, off, on, off ...) and each
keeps its fastest round (the least disturbed when the machine is shared). Without ``--checkpoint`` the model
is the ``--preset``'s at random init (random CLIP too): weights do not change the timing.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from capenext.cli import UsageError
from capenext.options import add_device

CONCURRENCY = (1, 8, 32)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", default=None,
                        help="checkpoint to serve (default: the --preset at random init, written to a temp dir)")
    parser.add_argument("--preset", default="tiny", help="config preset of the random-init model (default tiny)")
    parser.add_argument("--max-batch-size", type=int, default=16,
                        help="batch size with batching on (default 16); off is 1")
    parser.add_argument("--batch-wait-ms", type=float, default=5.0,
                        help="how long a request waits for company with batching on (default 5)")
    parser.add_argument("--requests", type=int, default=128, help="requests per concurrency level (default 128)")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds; the fastest counts (default 2)")
    parser.add_argument("--cpus", type=int, default=2, help="CPUs of the local Ray instance (default 2)")
    parser.add_argument("--cpus-per-replica", type=float, default=1.0,
                        help="CPUs (and torch threads) of the replica (default 1)")
    parser.add_argument("--keypoints", type=int, default=17, help="keypoint names per request (default 17)")
    parser.add_argument("--image-size", default="640x480", metavar="WxH",
                        help="size of the uploaded JPEG (default 640x480)")
    add_device(parser)


def _payload(width: int, height: int, keypoints: int) -> tuple[bytes, dict[str, str]]:
    """The upload, a photo-like JPEG (shaded background, shapes, sensor-like noise; quality 90), and the
    form's text fields: names, class, a chain skeleton and a box around the middle."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:height, 0:width] / max(width, height)
    rgb = np.stack([200 * x + 30, 160 * y + 40, 120 * (1 - x * y) + 60], -1)  # (H, W, 3)
    rgb = np.clip(rgb + rng.normal(0, 12, rgb.shape), 0, 255).astype(np.uint8)
    im = Image.fromarray(rgb)
    draw = ImageDraw.Draw(im)
    draw.ellipse((width // 4, height // 4, 3 * width // 4, 3 * height // 4), fill=(200, 80, 40))
    draw.rectangle((width // 8, 5 * height // 8, width // 3, 7 * height // 8), fill=(40, 90, 200))
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=90)
    names = [f"part {i}" for i in range(keypoints)]
    fields = {"keypoints": ",".join(names), "class": "cat",
              "skeleton": ",".join(f"{i}-{i + 1}" for i in range(keypoints - 1)),
              "bbox": f"{width // 8},{height // 8},{3 * width // 4},{3 * height // 4}"}
    return buf.getvalue(), fields


async def _level(url: str, image: bytes, fields: dict[str, str], concurrency: int, total: int,
                 timeout_s: float) -> dict[str, float]:
    """``total`` requests, ``concurrency`` in flight; requests/s over the wall time, latency percentiles."""
    import aiohttp

    latencies: list[float] = []
    todo = iter(range(total))
    failures = 0

    async def worker(session) -> None:
        nonlocal failures
        for _ in todo:
            form = aiohttp.FormData()
            for k, v in fields.items():
                form.add_field(k, v)
            form.add_field("image", image, filename="bench.jpg", content_type="image/jpeg")
            start = time.perf_counter()
            async with session.post(url, data=form) as r:
                await r.read()
                if r.status != 200:
                    failures += 1
            latencies.append(time.perf_counter() - start)

    limits = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=limits, timeout=aiohttp.ClientTimeout(total=timeout_s)) as session:
        start = time.perf_counter()
        await asyncio.gather(*(worker(session) for _ in range(concurrency)))
        wall = time.perf_counter() - start
    if failures:
        raise UsageError(f"{failures} of {total} requests failed at concurrency {concurrency}")
    ms = np.array(latencies) * 1000
    return {"requests_per_s": round(total / wall, 2), "p50_ms": round(float(np.percentile(ms, 50)), 1),
            "p95_ms": round(float(np.percentile(ms, 95)), 1)}


def _replica_stats(port: int) -> dict[str, int]:
    """The replica's query and forward counts so far (``/healthz``)."""
    import json
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=30) as r:
        return json.loads(r.read())["replica"]


def _check(args: argparse.Namespace) -> tuple[int, int]:
    """One line for each option out of range; the upload's ``(width, height)``."""
    import torch

    if min(args.max_batch_size, args.requests, args.rounds, args.cpus, args.keypoints) < 1:
        raise UsageError("--max-batch-size, --requests, --rounds, --cpus and --keypoints must be >= 1")
    if args.max_batch_size == 1:
        raise UsageError("--max-batch-size 1 is the batching-off side already: pass a larger size")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA device is visible here; use --device cpu")
    try:
        width, height = (int(v) for v in args.image_size.lower().split("x"))
    except ValueError:
        raise UsageError(f"--image-size {args.image_size!r}: WxH, e.g. 640x480") from None
    return width, height


def _random_checkpoint(preset: str, folder: str) -> str:
    """The preset's model at random init (random CLIP too), saved in ``folder``."""
    import torch

    from capenext.checkpoint import save_checkpoint
    from capenext.config import load_preset
    from capenext.models import build_model

    cfg = load_preset(preset)
    cfg.model.clip_checkpoint = "random"
    torch.manual_seed(0)
    checkpoint = str(Path(folder) / f"{preset}-random.pt")
    save_checkpoint(checkpoint, build_model(cfg.model), cfg)
    return checkpoint


def run(args: argparse.Namespace) -> dict[str, Any]:
    import ray
    from ray import serve

    from jobs.benchmarks import machine
    from jobs.serving.deployment import build_application
    from jobs.serving.options import APP_NAME, check_options
    from jobs.runtime.tracking import free_port

    width, height = _check(args)
    logging.getLogger("ray.serve").setLevel(logging.WARNING)
    image, fields = _payload(width, height, args.keypoints)
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="capenext-bench-serve-") as tmp:
        checkpoint = args.checkpoint or _random_checkpoint(args.preset, tmp)
        # the same deployment options on both sides; only the batch size (user_config) changes
        base = {"checkpoint": checkpoint, "device": args.device, "cpus_per_replica": args.cpus_per_replica,
                "batch_wait_ms": args.batch_wait_ms, "max_ongoing_requests": 2 * max(CONCURRENCY)}
        sides = {"batching_on": check_options({**base, "max_batch_size": args.max_batch_size}),
                 "batching_off": check_options({**base, "max_batch_size": 1})}
        port = free_port()
        url = f"http://127.0.0.1:{port}/v1/predict"
        started = not ray.is_initialized()
        if started:
            ray.init(num_cpus=args.cpus, num_gpus=1 if args.device.startswith("cuda") else 0, log_to_driver=False,
                     include_dashboard=False)
        serve.start(http_options={"host": "127.0.0.1", "port": port, "request_timeout_s": 120})
        best: dict[str, dict[int, dict[str, float]]] = {side: {} for side in sides}
        try:
            for _ in range(args.rounds):
                for side, options in sides.items():
                    serve.run(build_application(options, page={}), name=APP_NAME, route_prefix="/")
                    asyncio.run(_level(url, image, fields, 4, 16, 120))  # warm-up, after the reconfigure
                    for c in CONCURRENCY:
                        before = _replica_stats(port)
                        result = asyncio.run(_level(url, image, fields, c, args.requests, 300))
                        after = _replica_stats(port)
                        result["mean_batch"] = round((after["queries"] - before["queries"])
                                                     / max(after["batches"] - before["batches"], 1), 2)
                        if result["requests_per_s"] > best[side].get(c, {}).get("requests_per_s", 0):
                            best[side][c] = result
        finally:
            if started:
                ray.shutdown()  # Serve's actors go with the instance (serve.shutdown would only log more)
            else:
                serve.shutdown()
    ratio = {str(c): round(best["batching_on"][c]["requests_per_s"] / best["batching_off"][c]["requests_per_s"], 2)
             for c in CONCURRENCY}
    return {
        "benchmark": "serve",
        "device": args.device,
        "machine": machine(),
        "load_average_1min": {"before": round(load_before, 2), "after": round(os.getloadavg()[0], 2)},
        "ray_cpus": args.cpus,
        "cpus_per_replica": args.cpus_per_replica,
        "replicas": 1,
        "model": args.checkpoint or f"{args.preset} preset, random init",
        "request": {"image": f"{width}x{height} JPEG, {len(image)} bytes",
                    "keypoints": args.keypoints, "box": True, "answer": "JSON"},
        "requests_per_level": args.requests,
        "rounds": args.rounds,
        "timing": "fastest round per level",
        "max_batch_size": {"batching_on": args.max_batch_size, "batching_off": 1},
        "batch_wait_ms": args.batch_wait_ms,
        "results": {side: {str(c): r for c, r in sorted(levels.items())} for side, levels in best.items()},
        "throughput_ratio_on_vs_off": ratio,
        "goal_ratio_at_32": 2.0,
        "goal_met": ratio["32"] >= 2.0,
    }
