"""Model benchmark: ``python -m jobs.benchmark model``.

Training throughput of the full CapeNext step against the backbone alone, measured in the same run on the
same device and batch. Each step is forward + loss + backward + Adam step (bf16 autocast on CUDA, fp32 on
CPU) on fixed synthetic tensors already on the device, so the loader is not timed:

* ``backbone_only``: the backbone (timm trunk + 1x1 conv) with a mean-square loss on its map;
* ``full_precomputed``: the whole model, CLIP image embedding given as an input tensor;
* ``full_online``: the whole model, CLIP image embedding computed inside forward (frozen, no grad).

The configurations are timed in interleaved rounds of ``--steps`` steps; each keeps its fastest single
step (the least disturbed one when the machine is shared), so img/s = batch size / that step's time.
Ratios are ``img/s(full) / img/s(backbone_only)``; the goal is ``full_precomputed`` ≥ 0.85.
Peak memory is ``torch.cuda.max_memory_allocated`` per configuration on CUDA; on CPU it is the process's
peak resident set size after each configuration (cumulative, in the order above). CLIP and the backbone
are random-init: weights do not change the timing.
"""

from __future__ import annotations

import argparse
import dataclasses
import resource
import sys
import time
from contextlib import nullcontext
from typing import Any, Callable

import torch
import torch.nn.functional as F

from capenext.cli import UsageError
from capenext.config import MAX_KEYPOINTS, RunCfg, load_preset
from capenext.engine import make_optimizer
from capenext.losses import CapeNextLoss
from capenext.models import available_backbones, build_model, parameter_counts
from jobs.benchmarks import machine

GOAL_RATIO = 0.85  # full_precomputed img/s over backbone_only img/s


@dataclasses.dataclass(frozen=True)
class ModelBenchmark:
    """What one model benchmark measures (the ``model`` subcommand's options)."""

    device: str = "cpu"
    backbone: str = "swinv2_t"
    batch_size: int = 32
    preset: str = "swinv2_t"  # dims, image size and CLIP model
    ablation: str = "full"
    steps: int = 5  # timed steps per round
    rounds: int = 3  # interleaved rounds; the fastest step counts
    warmup: int = 2  # untimed steps per configuration
    threads: int | None = None  # torch intra-op CPU threads (None: torch's choice)
    compile: bool = False  # torch.compile the model and the backbone
    compile_backend: str = "inductor"
    fused_adam: bool | None = None  # None: the preset's optim.fused_adam, as jobs.train


def add_arguments(m: argparse.ArgumentParser) -> None:
    """The ``model`` subcommand's options."""
    m.add_argument("--backbone", default="swinv2_t", help="registered backbone (default swinv2_t)")
    m.add_argument("--batch-size", type=int, default=32, help="images per step (default 32)")
    m.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu",
                   help="where the model runs (default: cuda when available)")
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


def run(args: argparse.Namespace) -> dict[str, Any]:
    """The ``model`` subcommand: its options → :func:`benchmark_model`."""
    fields = {f.name for f in dataclasses.fields(ModelBenchmark)}
    return benchmark_model(ModelBenchmark(**{k: v for k, v in vars(args).items() if k in fields}))


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


def check(opts: ModelBenchmark) -> None:
    """One line for each option out of range (and the CPU thread count set)."""
    if opts.device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA device is visible here; use --device cpu")
    if opts.backbone not in available_backbones():
        raise UsageError(f"--backbone {opts.backbone!r} not registered; available: {available_backbones()}")
    if min(opts.batch_size, opts.steps, opts.rounds) < 1 or opts.warmup < 0:
        raise UsageError("--batch-size, --steps and --rounds must be >= 1 and --warmup >= 0")
    if opts.threads is not None:
        if opts.threads < 1:
            raise UsageError(f"--threads {opts.threads}: must be >= 1")
        torch.set_num_threads(opts.threads)


@dataclasses.dataclass
class Bench:
    """The model, its inputs and one step function per configuration, ready to time."""

    run: RunCfg
    model: torch.nn.Module
    steps: dict[str, Callable[[], None]]
    fused_adam: bool


def build(opts: ModelBenchmark, device: torch.device) -> Bench:
    """The random-init model on ``device``, a fixed batch, and the three configurations' training steps
    (``torch.compile``'d views of the same modules with ``compile``; the optimisers hold the same
    parameters)."""
    run = load_preset(opts.preset)
    cfg = dataclasses.replace(run.model, backbone=opts.backbone, ablation=opts.ablation,
                              clip_checkpoint="random", image_embedding="precomputed")
    torch.manual_seed(0)
    model = build_model(cfg).to(device).train()
    batch = synthetic_batch(opts.batch_size, run.data.image_size, run.data.heatmap_size, model.clip.embed_dim,
                            device)
    criterion = CapeNextLoss(run.optim.heatmap_weight)
    amp = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if device.type == "cuda" else nullcontext
    fused = run.optim.fused_adam if opts.fused_adam is None else opts.fused_adam
    optim = dataclasses.replace(run.optim, lr=1e-6, fused_adam=fused)
    full_opt = make_optimizer([p for p in model.parameters() if p.requires_grad], optim)
    backbone_opt = make_optimizer(model.backbone.parameters(), optim)
    net = torch.compile(model, backend=opts.compile_backend) if opts.compile else model
    trunk = torch.compile(model.backbone, backend=opts.compile_backend) if opts.compile else model.backbone

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

    steps = {"backbone_only": backbone_step, "full_precomputed": full_step("precomputed"),
             "full_online": full_step("online")}
    return Bench(run, model, steps, fused)


def time_steps(steps: dict[str, Callable[[], None]], device: torch.device, opts: ModelBenchmark
               ) -> tuple[dict[str, float], dict[str, float]]:
    """Warm-up (and per-configuration peak memory), then interleaved timed rounds; each configuration's
    fastest single step in seconds, and its peak memory in MiB."""
    best = {name: float("inf") for name in steps}
    peak = {}
    for name, step in steps.items():
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        for _ in range(max(opts.warmup, 1)):
            step()
        _sync(device)
        peak[name] = round(_peak_mb(device), 1)
    for _ in range(opts.rounds):
        for name, step in steps.items():
            for _ in range(opts.steps):
                _sync(device)
                start = time.perf_counter()
                step()
                _sync(device)
                best[name] = min(best[name], time.perf_counter() - start)
    return best, peak


def benchmark_model(opts: ModelBenchmark) -> dict[str, Any]:
    """The model benchmark of the module docstring; returns the JSON-ready result."""
    check(opts)
    device = torch.device(opts.device)
    bench = build(opts, device)
    best, peak = time_steps(bench.steps, device, opts)
    bench.model.image_embedding = "precomputed"
    img_s = {name: round(opts.batch_size / t, 3) for name, t in best.items()}
    ratios = {name: round(img_s[name] / img_s["backbone_only"], 3) for name in ("full_precomputed", "full_online")}
    cuda = device.type == "cuda"
    return {
        "benchmark": "model",
        "device": opts.device,
        "machine": torch.cuda.get_device_name(device) if cuda else machine()["cpu"],
        "cpu_threads": torch.get_num_threads(),
        "precision": "bf16 autocast" if cuda else "fp32",
        "torch": torch.__version__,
        "preset": opts.preset,
        "backbone": opts.backbone,
        "ablation": opts.ablation,
        "clip_model": bench.run.model.clip_model,
        "batch_size": opts.batch_size,
        "image_size": bench.run.data.image_size,
        "steps_per_round": opts.steps,
        "timing": "fastest single step per configuration",
        "rounds": opts.rounds,
        "compile": opts.compile_backend if opts.compile else None,
        "fused_adam": bench.fused_adam,
        "parameters": parameter_counts(bench.model),
        "train_img_per_s": img_s,
        "ratio_vs_backbone": ratios,
        "peak_memory_mb": peak,
        "peak_memory_kind": "cuda max_memory_allocated per config" if cuda
        else "process peak RSS after each config (cumulative)",
        "goal_full_precomputed_ratio": GOAL_RATIO,
        "goal_met": ratios["full_precomputed"] >= GOAL_RATIO,
    }
