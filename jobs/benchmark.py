"""Benchmarks that print JSON: ``python -m jobs.benchmark {model,...}``.

``model``: training throughput of the full CapeNext step against the backbone alone, measured in the same
run on the same device and batch. Each step is forward + loss + backward + Adam step (bf16 autocast on
CUDA, fp32 on CPU) on fixed synthetic tensors already on the device, so the loader is not timed:

* ``backbone_only``: the backbone (timm trunk + 1x1 conv) with a mean-square loss on its map;
* ``full_precomputed``: the whole model, CLIP image embedding given as an input tensor;
* ``full_online``: the whole model, CLIP image embedding computed inside forward (frozen, no grad).

The configurations are timed in interleaved rounds of ``--steps`` steps; each keeps its fastest single
step (the least disturbed one when the machine is shared), so img/s = batch size / that step's time.
Ratios are ``img/s(full) / img/s(backbone_only)``; the goal is ``full_precomputed`` ≥ 0.85.
Peak memory is ``torch.cuda.max_memory_allocated`` per configuration on CUDA; on CPU it is the process's
peak resident set size after each configuration (cumulative, in the order above). CLIP and the backbone
are random-init: weights do not change the timing.

Other subcommands (``loader``, ``embed``) are added next to ``model`` in :func:`build_parser`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import resource
import sys
import time
from contextlib import nullcontext
from typing import Callable

import torch
import torch.nn.functional as F

from capenext.cli import UsageError, run_main
from capenext.config import MAX_KEYPOINTS, load_preset
from capenext.engine import make_optimizer
from capenext.losses import CapeNextLoss
from capenext.models import available_backbones, build_model, parameter_counts
from jobs import bench_embed, bench_gpu, bench_loader, bench_serve
from jobs.common import machine


def synthetic_batch(batch_size: int, image_size: int, heatmap_size: int, embed_dim: int, device: torch.device,
                    keypoints: int = 17) -> dict[str, torch.Tensor]:
    """Fixed random inputs and targets shaped as the data layer makes them (``keypoints`` valid slots)."""
    g = torch.Generator().manual_seed(0)
    b, k = batch_size, MAX_KEYPOINTS
    mask = torch.zeros(b, k, dtype=torch.bool)
    mask[:, :keypoints] = True
    adj = torch.zeros(b, k, k)
    adj[:, torch.arange(keypoints - 1), torch.arange(1, keypoints)] = 1
    batch = {
        "img": torch.randn(b, 3, image_size, image_size, generator=g),
        "kp_emb": F.normalize(torch.randn(b, k, embed_dim, generator=g), dim=-1) * mask[..., None],
        "kp_mask": mask,
        "adj": adj,
        "cls_emb": F.normalize(torch.randn(b, embed_dim, generator=g), dim=-1),
        "img_emb": F.normalize(torch.randn(b, embed_dim, generator=g), dim=-1),
        "heatmap": torch.rand(b, k, heatmap_size, heatmap_size, generator=g),
        "points": torch.rand(b, k, 2, generator=g),
        "weight": mask.float(),
    }
    return {key: v.to(device) for key, v in batch.items()}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return rss / (2**20 if sys.platform == "darwin" else 2**10)


def benchmark_model(args: argparse.Namespace) -> dict:
    if args.device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA device is visible here; use --device cpu")
    if args.backbone not in available_backbones():
        raise UsageError(f"--backbone {args.backbone!r} not registered; available: {available_backbones()}")
    if min(args.batch_size, args.steps, args.rounds) < 1 or args.warmup < 0:
        raise UsageError("--batch-size, --steps and --rounds must be >= 1 and --warmup >= 0")
    if args.threads is not None:
        if args.threads < 1:
            raise UsageError(f"--threads {args.threads}: must be >= 1")
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    run = load_preset(args.preset)
    cfg = dataclasses.replace(run.model, backbone=args.backbone, ablation=args.ablation,
                              clip_checkpoint="random", image_embedding="precomputed")
    torch.manual_seed(0)
    model = build_model(cfg).to(device).train()
    batch = synthetic_batch(args.batch_size, run.data.image_size, run.data.heatmap_size, model.clip.embed_dim,
                            device)
    criterion = CapeNextLoss(run.optim.heatmap_weight)
    amp = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if device.type == "cuda" else nullcontext

    chosen = getattr(args, "fused_adam", None)  # None: the preset's optim.fused_adam, as jobs.train does
    optim = dataclasses.replace(run.optim, lr=1e-6, fused_adam=run.optim.fused_adam if chosen is None else chosen)
    full_opt = make_optimizer([p for p in model.parameters() if p.requires_grad], optim)
    backbone_opt = make_optimizer(model.backbone.parameters(), optim)
    # torch.compile'd views of the same modules (the optimisers hold the same parameters)
    compiled = getattr(args, "compile", False)
    backend = getattr(args, "compile_backend", "inductor")
    net = torch.compile(model, backend=backend) if compiled else model
    trunk = torch.compile(model.backbone, backend=backend) if compiled else model.backbone

    def backbone_step() -> None:
        with amp():
            feat = trunk(batch["img"])
        loss = feat.float().pow(2).mean()
        backbone_opt.zero_grad(set_to_none=True)
        loss.backward()
        backbone_opt.step()

    def full_step(mode: str) -> Callable[[], None]:
        def step() -> None:
            model.image_embedding = mode
            with amp():
                out = net(batch)
            out = {k: v.float() for k, v in out.items()}
            loss = criterion(out, batch["heatmap"], batch["points"], batch["weight"], batch["weight"])["loss"]
            full_opt.zero_grad(set_to_none=True)
            loss.backward()
            full_opt.step()
        return step

    configs = {
        "backbone_only": backbone_step,
        "full_precomputed": full_step("precomputed"),
        "full_online": full_step("online"),
    }
    best = {name: float("inf") for name in configs}
    peak = {}
    for name, step in configs.items():  # warm-up (and per-config peak memory)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        for _ in range(max(args.warmup, 1)):
            step()
        _sync(device)
        peak[name] = round(_peak_mb(device), 1)
    for _ in range(args.rounds):
        for name, step in configs.items():
            for _ in range(args.steps):
                _sync(device)
                start = time.perf_counter()
                step()
                _sync(device)
                best[name] = min(best[name], time.perf_counter() - start)
    model.image_embedding = "precomputed"

    img_s = {name: round(args.batch_size / t, 3) for name, t in best.items()}
    ratios = {name: round(img_s[name] / img_s["backbone_only"], 3) for name in ("full_precomputed", "full_online")}
    return {
        "benchmark": "model",
        "device": args.device,
        "machine": torch.cuda.get_device_name(device) if device.type == "cuda" else machine()["cpu"],
        "cpu_threads": torch.get_num_threads(),
        "precision": "bf16 autocast" if device.type == "cuda" else "fp32",
        "torch": torch.__version__,
        "preset": args.preset,
        "backbone": args.backbone,
        "ablation": args.ablation,
        "clip_model": cfg.clip_model,
        "batch_size": args.batch_size,
        "image_size": run.data.image_size,
        "steps_per_round": args.steps,
        "timing": "fastest single step per configuration",
        "rounds": args.rounds,
        "compile": backend if compiled else None,
        "fused_adam": optim.fused_adam,
        "parameters": parameter_counts(model),
        "train_img_per_s": img_s,
        "ratio_vs_backbone": ratios,
        "peak_memory_mb": peak,
        "peak_memory_kind": "cuda max_memory_allocated per config" if device.type == "cuda"
        else "process peak RSS after each config (cumulative)",
        "goal_full_precomputed_ratio": 0.85,
        "goal_met": ratios["full_precomputed"] >= 0.85,
    }


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m jobs.benchmark",
                                     description="Benchmarks; each prints one JSON object.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{model,loader,embed,serve,gpu-suite}")
    m = sub.add_parser("model", help="train img/s of the full model vs the backbone alone",
                       description="Train img/s of the full model (CLIP image embedding precomputed and online) "
                                   "against the backbone alone, measured in the same run; prints JSON.")
    m.add_argument("--backbone", default="swinv2_t", help="registered backbone (default swinv2_t)")
    m.add_argument("--batch-size", type=int, default=32, help="images per step (default 32)")
    m.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu",
                   help="default: cuda when available")
    m.add_argument("--preset", default="swinv2_t",
                   help="config preset for dims, image size and CLIP model (default swinv2_t; tiny for a smoke run)")
    m.add_argument("--ablation", default="full", help="ablation of the full model (default full)")
    m.add_argument("--steps", type=int, default=5, help="timed steps per round (default 5)")
    m.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3); the fastest step counts")
    m.add_argument("--warmup", type=int, default=2, help="untimed steps per configuration (default 2)")
    m.add_argument("--threads", type=int, default=None,
                   help="torch intra-op CPU threads (default: torch's choice); 1 is steadier on a shared machine")
    m.add_argument("--compile", action="store_true", help="torch.compile the model and the backbone (inductor)")
    m.add_argument("--fused-adam", action=argparse.BooleanOptionalAction, default=None,
                   help="Adam as one fused kernel, or not (default: the preset's optim.fused_adam, as jobs.train)")
    m.set_defaults(func=benchmark_model)
    loader = sub.add_parser("loader", help="training loader from shards vs per-file pycocotools + PIL",
                            description=bench_loader.__doc__)
    bench_loader.add_arguments(loader)
    loader.set_defaults(func=bench_loader.run)
    embed = sub.add_parser("embed", help="embedding job img/s vs a bare CLIP forward",
                           description=bench_embed.__doc__)
    bench_embed.add_arguments(embed)
    embed.set_defaults(func=bench_embed.run)
    serve = sub.add_parser("serve", help="Ray Serve requests/s and latency, batching on vs off",
                           description=bench_serve.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    bench_serve.add_arguments(serve)
    serve.set_defaults(func=bench_serve.run)
    gpu = sub.add_parser("gpu-suite", help="the GPU suite: model, a short training run, every CUDA path",
                         description=bench_gpu.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    bench_gpu.add_arguments(gpu)
    gpu.set_defaults(func=bench_gpu.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    print(json.dumps(args.func(args), indent=2), flush=True)
    return 0


if __name__ == "__main__":
    run_main(main)
