"""Serving benchmark: ``python -m jobs.benchmark serve``.

Requests per second and p50 / p95 latency of ``POST /v1/predict`` on a real Ray Serve (``jobs.serve``'s
application, one replica) at concurrency 1, 8 and 32 (``--concurrency``), with request batching on
(``--max-batch-size``, default 16) and off (max batch size 1), measured in one run against the same replica:
the application is deployed once and batching is switched by the replica's ``reconfigure`` (what a change of
the deployment's ``user_config`` calls), through a deployment handle, so the model stays loaded
(``replica_replaced`` says whether the replica's counts ever went back). A second ``serve.run`` would replace
the replica instead: Serve gives every ``serve.run`` a new code version. The ratio is requests/s with
batching over requests/s without, per concurrency; the goal is ≥ 2 at concurrency 32 on CPU.

Each request is one multipart upload of the same photo-like JPEG (``--image-size``, default 640x480) with
``--keypoints`` names, a class, a skeleton and a box, answered with the JSON points. The client is one
asyncio loop in this process holding ``concurrency`` requests in flight, ``--requests`` per level; it only
ever connects to 127.0.0.1. Levels run in interleaved ``--rounds`` (batching on, off, on, off ...) and each
keeps its fastest round (the least disturbed when the machine is shared). Without ``--checkpoint`` the model
is the ``--preset``'s at random init (random CLIP too): weights do not change the timing.

``--quick`` is the tests' smoke run: one Serve start-up and one replica as always, concurrency 1 and 8
(``--concurrency``), 16 requests per level, one round, a 4-request warm-up and a 320x240 JPEG; the 32 of the
goal is not measured, so ``goal_met`` is null. Without a Ray instance it starts one (``--cpus``); in a process
that has one (the tests' session), it uses that one and stops only Serve at the end.
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
from jobs.benchmarks import sizes as bench_sizes

FULL = {"concurrency": "1,8,32", "requests": 128, "rounds": 2, "warmup": 16, "image_size": "640x480"}
QUICK = {"concurrency": "1,8", "requests": 16, "rounds": 1, "warmup": 4, "image_size": "320x240"}
GOAL_CONCURRENCY, GOAL_RATIO = 32, 2.0  # batching on at least 2x the requests/s of off, at concurrency 32


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", default=None,
                        help="checkpoint to serve (default: the --preset at random init, written to a temp dir)")
    parser.add_argument("--preset", default="tiny", help="config preset of the random-init model (default tiny)")
    parser.add_argument("--max-batch-size", type=int, default=16,
                        help="batch size with batching on (default 16); off is 1")
    parser.add_argument("--batch-wait-ms", type=float, default=5.0,
                        help="how long a request waits for company with batching on (default 5)")
    parser.add_argument("--concurrency", default=None, metavar="C1,C2,...",
                        help=f"requests in flight per level (default {FULL['concurrency']}; quick "
                             f"{QUICK['concurrency']})")
    parser.add_argument("--requests", type=int, default=None,
                        help=f"requests per concurrency level (default {FULL['requests']}; quick {QUICK['requests']})")
    parser.add_argument("--rounds", type=int, default=None,
                        help=f"interleaved rounds; the fastest counts (default {FULL['rounds']}; quick "
                             f"{QUICK['rounds']})")
    parser.add_argument("--warmup", type=int, default=None,
                        help=f"untimed requests at concurrency 4 after each switch of batching (default "
                             f"{FULL['warmup']}; quick {QUICK['warmup']})")
    parser.add_argument("--cpus", type=int, default=2,
                        help="CPUs of the Ray instance it starts when its process has none (default 2)")
    parser.add_argument("--cpus-per-replica", type=float, default=1.0,
                        help="CPUs (and torch threads) of the replica (default 1)")
    parser.add_argument("--keypoints", type=int, default=17, help="keypoint names per request (default 17)")
    parser.add_argument("--image-size", default=None, metavar="WxH",
                        help=f"size of the uploaded JPEG (default {FULL['image_size']}; quick {QUICK['image_size']})")
    parser.add_argument("--quick", action="store_true",
                        help="the tests' smoke run: concurrency 1 and 8, 16 requests each, one round, 320x240")
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


def _check(args: argparse.Namespace) -> dict[str, Any]:
    """One line for each option out of range; the sizes (the flags given, else the quick or full defaults),
    with ``concurrency`` as a tuple and ``image_size`` as ``(width, height)``."""
    import torch

    sizes = bench_sizes(args, QUICK, FULL)
    if min(args.max_batch_size, sizes["requests"], sizes["rounds"], args.cpus, args.keypoints) < 1:
        raise UsageError("--max-batch-size, --requests, --rounds, --cpus and --keypoints must be >= 1")
    if sizes["warmup"] < 0:
        raise UsageError(f"--warmup must be >= 0, got {sizes['warmup']}")
    if args.max_batch_size == 1:
        raise UsageError("--max-batch-size 1 is the batching-off side already: pass a larger size")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA device is visible here; use --device cpu")
    try:
        levels = tuple(sorted({int(v) for v in sizes["concurrency"].split(",")}))
    except ValueError:
        levels = ()
    if not levels or levels[0] < 1:
        raise UsageError(f"--concurrency {sizes['concurrency']!r}: positive integers, comma-separated, e.g. 1,8,32")
    try:
        width, height = (int(v) for v in sizes["image_size"].lower().split("x"))
    except ValueError:
        raise UsageError(f"--image-size {sizes['image_size']!r}: WxH, e.g. 640x480") from None
    if min(width, height) < 16:
        raise UsageError(f"--image-size {sizes['image_size']!r}: at least 16x16")
    return {**sizes, "concurrency": levels, "image_size": (width, height)}


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


def _measure(options: Any, port: int, image: bytes, fields: dict[str, str],
             sizes: dict[str, Any]) -> tuple[dict[str, dict[int, dict[str, float]]], bool]:
    """Every level with batching on and off, ``rounds`` times interleaved, on one replica of ``options``
    deployed once; each level's fastest round, with the mean batch the replica formed (its ``/healthz``
    counts before and after). Also whether the replica was ever replaced (its counts went back)."""
    from ray import serve

    from jobs.serving.deployment import build_application
    from jobs.serving.options import APP_NAME, DEPLOYMENT_NAME

    url = f"http://127.0.0.1:{port}/v1/predict"
    serve.run(build_application(options, page={}), name=APP_NAME, route_prefix="/")
    # batching is switched by the replica's reconfigure (what a user_config change calls), so the replica
    # and its model stay; a second serve.run would replace the replica (a new code version every run)
    handle = serve.get_deployment_handle(DEPLOYMENT_NAME, APP_NAME)
    sides = {"batching_on": options.max_batch_size, "batching_off": 1}
    best: dict[str, dict[int, dict[str, float]]] = {side: {} for side in sides}
    served, replaced = 0, False
    for _ in range(sizes["rounds"]):
        for side, batch in sides.items():
            handle.reconfigure.remote({"max_batch_size": batch, "batch_wait_ms": options.batch_wait_ms}).result()
            if sizes["warmup"]:
                asyncio.run(_level(url, image, fields, 4, sizes["warmup"], 120))  # after the switch
            for c in sizes["concurrency"]:
                before = _replica_stats(port)
                result = asyncio.run(_level(url, image, fields, c, sizes["requests"], 300))
                after = _replica_stats(port)
                replaced |= before["queries"] < served
                served = after["queries"]
                result["mean_batch"] = round((after["queries"] - before["queries"])
                                             / max(after["batches"] - before["batches"], 1), 2)
                if result["requests_per_s"] > best[side].get(c, {}).get("requests_per_s", 0):
                    best[side][c] = result
    return best, replaced


def run(args: argparse.Namespace) -> dict[str, Any]:
    import ray
    from ray import serve

    from jobs.benchmarks import machine
    from jobs.runtime.tracking import free_port
    from jobs.serving.options import check_options

    sizes = _check(args)
    width, height = sizes["image_size"]
    logging.getLogger("ray.serve").setLevel(logging.WARNING)
    image, fields = _payload(width, height, args.keypoints)
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="capenext-bench-serve-") as tmp:
        checkpoint = args.checkpoint or _random_checkpoint(args.preset, tmp)
        # one deployment; batching off is the same replica with its batch size set to 1
        base = {"checkpoint": checkpoint, "device": args.device, "cpus_per_replica": args.cpus_per_replica,
                "batch_wait_ms": args.batch_wait_ms,
                "max_ongoing_requests": 2 * max(GOAL_CONCURRENCY, *sizes["concurrency"])}
        options = check_options({**base, "max_batch_size": args.max_batch_size})
        port = free_port()
        started = not ray.is_initialized()
        if started:
            ray.init(num_cpus=args.cpus, num_gpus=1 if args.device.startswith("cuda") else 0, log_to_driver=False,
                     include_dashboard=False)
        ray_cpus = ray.cluster_resources().get("CPU", 0)
        serve.start(http_options={"host": "127.0.0.1", "port": port, "request_timeout_s": 120})
        try:
            best, replaced = _measure(options, port, image, fields, sizes)
        finally:
            if started:
                ray.shutdown()  # Serve's actors go with the instance (serve.shutdown would only log more)
            else:
                serve.shutdown()
    levels = sizes["concurrency"]
    ratio = {str(c): round(best["batching_on"][c]["requests_per_s"] / best["batching_off"][c]["requests_per_s"], 2)
             for c in levels}
    goal = str(GOAL_CONCURRENCY)
    return {
        "benchmark": "serve",
        "quick": bool(args.quick),
        "device": args.device,
        "machine": machine(),
        "load_average_1min": {"before": round(load_before, 2), "after": round(os.getloadavg()[0], 2)},
        "ray_cpus": ray_cpus,
        "ray_instance": "started for the benchmark" if started else "the process's own, already running",
        "cpus_per_replica": args.cpus_per_replica,
        "replicas": 1,
        "replica_replaced": replaced,
        "model": args.checkpoint or f"{args.preset} preset, random init",
        "request": {"image": f"{width}x{height} JPEG, {len(image)} bytes",
                    "keypoints": args.keypoints, "box": True, "answer": "JSON"},
        "concurrency": list(levels),
        "requests_per_level": sizes["requests"],
        "rounds": sizes["rounds"],
        "warmup_requests": sizes["warmup"],
        "timing": "fastest round per level",
        "max_batch_size": {"batching_on": args.max_batch_size, "batching_off": 1},
        "batch_wait_ms": args.batch_wait_ms,
        "results": {side: {str(c): r for c, r in sorted(levels_.items())} for side, levels_ in best.items()},
        "throughput_ratio_on_vs_off": ratio,
        "goal_ratio_at_32": GOAL_RATIO,
        "goal_met": ratio[goal] >= GOAL_RATIO if goal in ratio else None,
    }
