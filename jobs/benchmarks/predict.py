"""Prediction benchmark: ``python -m jobs.benchmark predict``: PyTorch against ONNX (onnxruntime) on CPU.

Both runtimes of :class:`capenext.predict.Predictor` (``runtime="torch"`` and ``runtime="onnx"``) are loaded
from one checkpoint in one process and measured on the same inputs, interleaved call by call (torch, onnx,
onnx, torch, ...), so that a machine shared with other work slows both alike:

* **single-image latency**: :meth:`Predictor.predict` on one query, ``--calls`` times per runtime after
  ``--warmup`` calls per query; median and p90 in ms;
* **batched throughput**: :meth:`Predictor.predict_many` on ``--batch-size`` queries in one forward,
  ``--rounds`` times per runtime; queries/s of the median round.

Each also gives its fastest call and round (``ratio_onnx_vs_torch_fastest``): on a machine shared with other
jobs those are the least disturbed, and PyTorch's OpenMP threads suffer more from other work than
onnxruntime's, so the medians' ratio grows with the machine's load.

The queries are synthetic, photo-like images of three sizes (a box on two of them, the whole image on the
third) with 5, 17 and 40 keypoint names, a class and a chain skeleton; the images go in decoded (decoding is
the same for both), and the text embeddings are cached after the warm-up (a server asked the same names
again, :data:`capenext.predict.TEXT_CACHE_SIZE`). Torch runs on as many intra-op threads as onnxruntime's
sessions (:mod:`capenext.export`: min(4, cores)), so both use the same cores.

The JSON has each runtime's figures, ``ratio_onnx_vs_torch`` (latency: torch ms / onnx ms; throughput: onnx
queries/s / torch queries/s; above 1, onnx is faster), ``max_point_diff_px`` (the largest |Δx| or |Δy| between
the runtimes' points over every query, alone and batched, in image pixels), ``points_agree`` (within 0.5 px),
the machine, and ``serving_default``: onnx when its points agree and it is faster in both latency and
throughput, else torch. Without ``--onnx`` the checkpoint is exported first (:func:`capenext.export.export`,
verified against PyTorch) into a temporary folder, timed as ``export_s``. Without ``--checkpoint`` the model is
the ``--preset``'s at random init (random CLIP too): weights do not change the timing. ``--quick`` is the smoke
run of the tests (tiny preset unless ``--checkpoint``, a few calls).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from capenext.cli import UsageError
from capenext.options import RUNTIMES, add_tracking_uri
from jobs.benchmarks import sizes as bench_sizes

AGREE_PX = 0.5  # the largest point difference between runtimes that counts as the same prediction
KEYPOINTS = (5, 17, 40)  # keypoint names of the three queries
IMAGES = ((640, 480), (480, 640), (800, 600))  # (width, height) of the three queries' images
FULL = {"calls": 30, "warmup": 2, "batch_size": 8, "rounds": 5}
QUICK = {"calls": 4, "warmup": 1, "batch_size": 4, "rounds": 2}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", default=None,
                        help="checkpoint to measure: a file, runs:/..., a run id or models:/... (default: the "
                             "--preset at random init, written to a temp dir)")
    parser.add_argument("--preset", default=None,
                        help="config preset of the random-init model (default swinv2_t; tiny with --quick)")
    parser.add_argument("--onnx", default=None, metavar="DIR",
                        help="the export of --checkpoint (python -m jobs.export); default: exported here into a "
                             "temp dir first")
    parser.add_argument("--runtime", default="torch,onnx",
                        help="runtimes to measure, comma-separated (default torch,onnx; the ratios need both)")
    parser.add_argument("--calls", type=int, default=None,
                        help=f"single-image calls per runtime (default {FULL['calls']}; quick {QUICK['calls']})")
    parser.add_argument("--warmup", type=int, default=None,
                        help=f"untimed calls per query and runtime first, at least 1 (its points are the ones "
                             f"compared; default {FULL['warmup']}), and one batched forward")
    parser.add_argument("--batch-size", type=int, default=None,
                        help=f"queries per predict_many forward (default {FULL['batch_size']}; quick "
                             f"{QUICK['batch_size']})")
    parser.add_argument("--rounds", type=int, default=None,
                        help=f"batched forwards per runtime (default {FULL['rounds']}; quick {QUICK['rounds']})")
    parser.add_argument("--clip-checkpoint", default=None,
                        help="where the frozen CLIP's weights are on this machine (default: the checkpoint "
                             "config's)")
    parser.add_argument("--quick", action="store_true", help="the tests' smoke run: a few calls, tiny preset")
    add_tracking_uri(parser)


def _runtimes(text: str) -> list[str]:
    """``--runtime`` as a list: known names, no repeats; one line otherwise."""
    names = [r.strip() for r in text.split(",") if r.strip()]
    bad = [r for r in names if r not in RUNTIMES]
    if not names or bad or len(set(names)) != len(names):
        raise UsageError(f"--runtime {text!r}: a comma-separated list of {', '.join(RUNTIMES)}, each once")
    return names


def _sizes(args: argparse.Namespace) -> dict[str, int]:
    """Calls, warm-up, batch size and rounds: the flags given, else the quick or full defaults."""
    sizes = bench_sizes(args, QUICK, FULL)
    floor = {"calls": 1, "warmup": 1, "batch_size": 1, "rounds": 1}
    for key, value in sizes.items():
        if value < floor[key]:
            raise UsageError(f"--{key.replace('_', '-')} must be >= {floor[key]}, got {value}")
    return sizes


def _image(width: int, height: int, seed: int) -> np.ndarray:
    """A photo-like (H, W, 3) uint8 image: shaded background, two shapes, sensor-like noise."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width] / max(width, height)
    rgb = np.stack([200 * x + 30, 160 * y + 40, 120 * (1 - x * y) + 60], -1)  # (H, W, 3)
    im = Image.fromarray(np.clip(rgb + rng.normal(0, 12, rgb.shape), 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(im)
    draw.ellipse((width // 4, height // 4, 3 * width // 4, 3 * height // 4), fill=(200, 80, 40))
    draw.rectangle((width // 8, 5 * height // 8, width // 3, 7 * height // 8), fill=(40, 90, 200))
    return np.asarray(im)


def _queries():
    """The three queries: one per image size and keypoint count; a box on the first two."""
    from capenext.predict import Query

    out = []
    for i, ((w, h), k) in enumerate(zip(IMAGES, KEYPOINTS)):
        names = [f"part {j} of the body" for j in range(k)]
        bbox = (w / 8, h / 8, 3 * w / 4, 3 * h / 4) if i < 2 else None
        out.append(Query(_image(w, h, i), names, "cat", [(j, j + 1) for j in range(k - 1)], bbox))
    return out


def _checkpoint(args: argparse.Namespace, preset: str, folder: Path) -> str:
    """``--checkpoint`` as a local file (MLflow sources fetched into ``folder``), or the preset's model at
    random init (random CLIP too) saved there."""
    import torch

    if args.checkpoint is not None:
        if Path(args.checkpoint).is_file():
            return args.checkpoint
        from jobs.runtime.checkpoints import resolve_checkpoint
        from jobs.runtime.tracking import tracking_uri

        return str(resolve_checkpoint(args.checkpoint, tracking_uri(args.tracking_uri), folder).path)
    from capenext.checkpoint import save_checkpoint
    from capenext.config import load_preset
    from capenext.models import build_model

    cfg = load_preset(preset)
    cfg.model.clip_checkpoint = "random"
    torch.manual_seed(0)
    path = folder / f"{preset}-random.pt"
    save_checkpoint(path, build_model(cfg.model), cfg)
    return str(path)


def _predictors(args: argparse.Namespace, runtimes: list[str], checkpoint: str, folder: Path
                ) -> tuple[dict[str, Any], float | None]:
    """One :class:`Predictor` per runtime; the export's seconds when it was made here (``None`` with
    ``--onnx``). A folder of another checkpoint is refused in one line by the predictor."""
    from capenext.predict import Predictor

    onnx_dir, export_s = args.onnx, None
    if "onnx" in runtimes and onnx_dir is None:
        try:
            from capenext.export import export
        except ImportError as err:
            raise UsageError(f"--runtime onnx needs onnx and onnxruntime ({err.name} is missing): "
                             "pip install 'capenext[onnx]'") from None
        started = time.perf_counter()
        onnx_dir = folder / "onnx"
        export(checkpoint, onnx_dir, clip_checkpoint=args.clip_checkpoint)
        export_s = time.perf_counter() - started
    predictors = {r: Predictor(checkpoint, clip_checkpoint=args.clip_checkpoint, runtime=r,
                               onnx_dir=onnx_dir if r == "onnx" else None) for r in runtimes}
    return predictors, export_s


def _threads(predictors: dict[str, Any]) -> int:
    """The intra-op threads of onnxruntime's pose session (min(4, cores) without one), given to torch too."""
    onnx = predictors.get("onnx")
    if onnx is not None:
        return int(onnx.onnx.sessions["pose"].get_session_options().intra_op_num_threads)
    return max(1, min(4, os.cpu_count() or 1))


def _interleaved(runtimes: list[str], i: int) -> list[str]:
    """The runtimes in call ``i``'s order: forwards on even calls, backwards on odd ones."""
    return runtimes if i % 2 == 0 else runtimes[::-1]


def _latency(predictors: dict[str, Any], queries: list, calls: int) -> dict[str, list[float]]:
    """Milliseconds of ``calls`` :meth:`Predictor.predict` calls per runtime, cycling through the queries."""
    ms: dict[str, list[float]] = {r: [] for r in predictors}
    for i in range(calls):
        q = queries[i % len(queries)]
        for r in _interleaved(list(predictors), i):
            started = time.perf_counter()
            predictors[r].predict(q.image, q.names, q.class_name, q.skeleton, q.bbox)
            ms[r].append((time.perf_counter() - started) * 1000)
    return ms


def _batched(predictors: dict[str, Any], batch: list, rounds: int) -> tuple[dict[str, list[float]], dict]:
    """Seconds of ``rounds`` :meth:`Predictor.predict_many` forwards of ``batch`` per runtime, and each
    runtime's points of the first round."""
    seconds: dict[str, list[float]] = {r: [] for r in predictors}
    points: dict[str, list] = {}
    for i in range(rounds):
        for r in _interleaved(list(predictors), i):
            started = time.perf_counter()
            out = predictors[r].predict_many(batch)
            seconds[r].append(time.perf_counter() - started)
            points.setdefault(r, out)
    return seconds, points


def _max_diff(a: list[list[dict]], b: list[list[dict]]) -> float:
    """The largest |Δx| or |Δy| (image pixels) between two runtimes' points on the same queries."""
    diffs = [max(abs(p["x"] - q["x"]), abs(p["y"] - q["y"])) for pa, pb in zip(a, b) for p, q in zip(pa, pb)]
    return max(diffs) if diffs else 0.0


def _figures(ms: list[float], seconds: list[float], batch_size: int) -> dict[str, Any]:
    """A runtime's latency percentiles and batched queries/s (of the median round; the fastest call and round
    too, the least disturbed on a shared machine)."""
    median_s, fastest_s = float(np.median(seconds)), float(min(seconds))
    return {"latency_ms": {"median": round(float(np.median(ms)), 2), "p90": round(float(np.percentile(ms, 90)), 2),
                           "fastest": round(float(min(ms)), 2), "calls": len(ms)},
            "batched": {"batch_size": batch_size, "median_forward_ms": round(median_s * 1000, 1),
                        "queries_per_s": round(batch_size / median_s, 2),
                        "fastest_queries_per_s": round(batch_size / fastest_s, 2), "rounds": len(seconds)}}


def _comparison(figures: dict[str, dict], alone: dict[str, list], batched: dict[str, list]) -> dict[str, Any]:
    """Ratios, agreement and the serving default from both runtimes' figures and points."""
    if set(figures) != set(RUNTIMES):
        return {"ratio_onnx_vs_torch": None, "ratio_onnx_vs_torch_fastest": None, "max_point_diff_px": None,
                "points_agree": None, "serving_default": "torch"}
    t, o = figures["torch"], figures["onnx"]
    ratio = {"latency": round(t["latency_ms"]["median"] / o["latency_ms"]["median"], 3),
             "throughput": round(o["batched"]["queries_per_s"] / t["batched"]["queries_per_s"], 3)}
    fastest = {"latency": round(t["latency_ms"]["fastest"] / o["latency_ms"]["fastest"], 3),
               "throughput": round(o["batched"]["fastest_queries_per_s"] / t["batched"]["fastest_queries_per_s"], 3)}
    diff = max(_max_diff(alone["torch"], alone["onnx"]), _max_diff(batched["torch"], batched["onnx"]))
    agree = diff <= AGREE_PX
    faster = ratio["latency"] > 1 and ratio["throughput"] > 1
    return {"ratio_onnx_vs_torch": ratio, "ratio_onnx_vs_torch_fastest": fastest,
            "max_point_diff_px": float(f"{diff:.3g}"), "points_agree": agree,
            "serving_default": "onnx" if agree and faster else "torch"}


def run(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from jobs.benchmarks import machine

    runtimes, sizes = _runtimes(args.runtime), _sizes(args)
    if args.onnx is not None and "onnx" not in runtimes:
        raise UsageError("--onnx DIR is read when --runtime includes onnx: add onnx to --runtime")
    preset = args.preset or ("tiny" if args.quick else "swinv2_t")
    queries = _queries()
    batch = [queries[i % len(queries)] for i in range(sizes["batch_size"])]
    load_before, threads_before = os.getloadavg()[0], torch.get_num_threads()
    with tempfile.TemporaryDirectory(prefix="capenext-bench-predict-") as tmp:
        checkpoint = _checkpoint(args, preset, Path(tmp))
        predictors, export_s = _predictors(args, runtimes, checkpoint, Path(tmp))
        threads = _threads(predictors)
        torch.set_num_threads(threads)
        try:
            alone = {r: [p.predict(q.image, q.names, q.class_name, q.skeleton, q.bbox) for q in queries]
                     for r, p in predictors.items()}  # the first warm-up call per query: the points compared
            _latency(predictors, queries, len(queries) * (sizes["warmup"] - 1))  # the other warm-up calls
            for p in predictors.values():
                p.predict_many(batch)  # and one batched forward
            ms = _latency(predictors, queries, sizes["calls"])
            seconds, batched = _batched(predictors, batch, sizes["rounds"])
        finally:
            torch.set_num_threads(threads_before)
        cfg = next(iter(predictors.values())).cfg
    figures = {r: _figures(ms[r], seconds[r], sizes["batch_size"]) for r in runtimes}
    return {
        "benchmark": "predict", "machine": machine(),
        "load_average_1min": {"before": round(load_before, 2), "after": round(os.getloadavg()[0], 2)},
        "model": args.checkpoint or f"{preset} preset, random init",
        "config": {"backbone": cfg.model.backbone, "clip_model": cfg.model.clip_model, "ablation": cfg.model.ablation,
                   "image_size": cfg.data.image_size, "image_embedding": cfg.model.image_embedding},
        "threads": threads, "quick": bool(args.quick), **sizes,
        "inputs": {"images": [f"{w}x{h}" for w, h in IMAGES], "keypoints": list(KEYPOINTS),
                   "boxes": [True, True, False], "decoded": True, "text_embeddings": "cached after the warm-up"},
        "export_s": None if export_s is None else round(export_s, 1),
        "runtimes": figures,
        **_comparison(figures, alone, batched),
        "agree_within_px": AGREE_PX,
        "serving_default_rule": "onnx if its points agree and it is faster in latency and throughput, else torch",
    }
