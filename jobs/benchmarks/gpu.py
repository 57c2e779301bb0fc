"""The GPU suite: ``python -m jobs.benchmark gpu-suite [--device cuda|cpu] [--quick] [--out FILE]``.

One prepared run that records, as one JSON object naming the machine (:func:`jobs.benchmarks.machine`):

* ``model``: the model benchmark (:func:`jobs.benchmarks.model.benchmark_model`) with the Swin V2-T backbone at
  batch 32 and 128 (bf16 autocast on CUDA): img/s of the backbone alone and of the full model with
  precomputed and with online CLIP image embeddings, peak memory, the ratio full(precomputed) / backbone
  against the goal ≥ 0.85; each batch eager, with ``torch.compile`` and with fused Adam;
* ``training``: a short ``python -m jobs.train --local`` run (``--device cuda`` on CUDA) of Swin V2-T at random
  weights with the preset's CLIP at random weights, on split 1 of a synthetic set with MP-100's image sizes
  (``pipelines.synthetic --mp100-sized``, then ``pipelines.shard`` and ``pipelines.embed``, the embedding
  job's CLIP actors on ``--device``): img/s from
  the run's epoch lines, GPU utilisation sampled from ``nvidia-smi`` (null without one), the CPU cores
  busy over the run (the whole machine's, and the run's own processes'), and the projected time of 200
  epochs of one MP-100 split (14 000 pairs an epoch) against the goal ≤ 1.5 h;
* ``smoke``: every path with a CUDA branch once, each ``ok`` or ``failed`` with a one-line reason: the
  embedding job (its CLIP actors on the device), a training step with ``--image-embedding
  online``, ``jobs.evaluate``, ``jobs.predict`` and ``jobs.serve`` (started, one request, stopped) on
  the device, and the reference's fp16 CLIP (``model.clip_precision=fp16``) against fp32 on the same
  weights: on CUDA the cosine of their text and image embeddings must be ≥ 0.99; on CPU fp16 must be
  refused in one line, as documented;
* ``data``: what it ran on (the synthetic set it made, or the folders it was given) and ``ray``: whether it
  started Ray, and for what.

Existing data instead of the synthetic set: ``--data-root DIR`` (an MP-100-layout folder: it is sharded and
embedded, and the predict and serve smokes read an image from it), and with it ``--shards DIR
--embeddings DIR`` (both or neither): shards of that folder and tables made from them for the run's config
(``pipelines.embed --config swinv2_t --clip-checkpoint random``; ``--config tiny`` with ``--quick``), used
instead of the shard and embedding jobs, so the ``embed`` smoke is not run (it is listed under
``skipped_smokes``). Tables of another config or of other shards are refused in one line before anything
starts, as ``jobs.train`` refuses them.

Ray starts only when something needs it (the shard and embedding jobs, the ``serve`` smoke): this process
starts a local instance the first time and stops it at the end; with given shards and tables and
``serve`` skipped, none is started. The training runs, the synthetic set's generation and the server run
as subprocesses (``RAY_ADDRESS`` names the suite's instance once it is started, and is left out of their
environment before; ``jobs.train --local`` needs no Ray); the shard and embedding jobs (their public
``run``) and the evaluation and prediction jobs (their ``main``) run in this process, which saves an
interpreter start each. Each job's output is in ``logs/`` of ``--workdir``.
``--quick`` runs the same suite at toy sizes (tiny backbone and CLIP, a few steps, 3 images per category,
``torch.compile`` with the ``eager`` backend at one batch size); ``--device cpu --quick`` with the test
suite's own synthetic set, shards and tables (``--data-root``, ``--shards``, ``--embeddings``) is what the
test suite runs.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, Callable

import torch

from capenext.cli import UsageError
from jobs.benchmarks import machine
from jobs.benchmarks.model import GOAL_RATIO, ModelBenchmark, benchmark_model
from jobs.runtime.tracking import free_port

CATEGORIES = 20  # of the synthetic set
PAIRS_PER_EPOCH = 14_000  # training pairs in one epoch of an MP-100 split
EPOCHS = 200  # the paper's schedule
GOAL_HOURS = 1.5
# not "embed": training needs its tables (it is not run when --shards and --embeddings give them)
SKIPPABLE = ("clip_fp16", "train_online", "evaluate", "predict", "serve")
EPOCH_LINE = re.compile(r"^epoch (\d+)/(\d+) .* ([0-9.]+) img/s", re.MULTILINE)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                        help="where the model, the training run and the smokes run (default cuda)")
    parser.add_argument("--quick", action="store_true",
                        help="toy sizes: tiny backbone and CLIP, a few steps and images (seconds per section)")
    parser.add_argument("--out", type=Path, default=None, help="also write the JSON to this file")
    parser.add_argument("--workdir", type=Path, default=None,
                        help="folder for the data, runs and logs (default: a temporary one, removed after)")
    parser.add_argument("--steps", type=int, default=None,
                        help="optimizer steps of the training run in all (default 300; 4 with --quick)")
    parser.add_argument("--loader-workers", type=int, default=None,
                        help="DataLoader processes of the training run (default: CPU cores - 2, at most 8; "
                             "0 with --quick)")
    parser.add_argument("--images-per-category", type=int, default=None,
                        help="synthetic images per category, 20 categories (default 100; 3 with --quick); not "
                             "with --data-root")
    parser.add_argument("--skip-smokes", default="", metavar="NAMES",
                        help=f"smokes not to run, comma-separated, from {', '.join(SKIPPABLE)} (default: none; the "
                             "test suite skips those its other tests run); the JSON lists them under skipped_smokes "
                             "(with embed when --embeddings is given)")
    g = parser.add_argument_group("existing data instead of the synthetic set (the JSON's data entry says which)")
    g.add_argument("--data-root", type=Path, default=None, metavar="DIR",
                   help="an MP-100-layout folder (images/, annotations/) used instead of generating the synthetic "
                        "set: training runs on its split 1, the predict and serve smokes read an image from it")
    g.add_argument("--shards", type=Path, default=None, metavar="DIR",
                   help="with --data-root and --embeddings: the folder's shards (pipelines.shard), used instead of "
                        "running the shard job")
    g.add_argument("--embeddings", type=Path, default=None, metavar="DIR",
                   help="with --shards: tables made from those shards for the run's config (pipelines.embed "
                        "--config swinv2_t --clip-checkpoint random; --config tiny with --quick), used instead of "
                        "running the embedding job, so the embed smoke is skipped; tables of another config or "
                        "other shards are refused in one line before anything starts")


def skipped_smokes(text: str) -> tuple[str, ...]:
    """``--skip-smokes``'s names; an unknown one is a usage error."""
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    unknown = sorted(set(names) - set(SKIPPABLE))
    if unknown:
        why = (" (embed is the embedding job, whose tables training needs: it is not run when --shards and "
               "--embeddings give existing ones)" if unknown[0] == "embed" else "")
        raise UsageError(f"--skip-smokes: unknown smoke {unknown[0]!r}; these can be skipped: "
                         f"{', '.join(SKIPPABLE)}{why}")
    return names


# --- settings -------------------------------------------------------------------------------------------


def settings(args: argparse.Namespace) -> dict[str, Any]:
    """Sizes of every section: the real ones, or toy ones with ``--quick``."""
    cores = os.cpu_count() or 1
    if args.quick:
        s = {"preset": "tiny", "backbone": "tiny", "batches": [2, 4], "bench_steps": 1, "bench_rounds": 1,
             "bench_warmup": 1, "steps": 4, "loader_workers": 0, "images_per_category": 3,
             "train_batch": 4, "mp100_sized": False, "compile_backend": "eager", "compile_batches": [4],
             "threads": 1}
    else:
        s = {"preset": "swinv2_t", "backbone": "swinv2_t", "batches": [32, 128], "bench_steps": 5,
             "bench_rounds": 3, "bench_warmup": 3, "steps": 300, "loader_workers": max(0, min(8, cores - 2)),
             "images_per_category": 100, "train_batch": None, "mp100_sized": True, "compile_backend": "inductor",
             "compile_batches": [32, 128], "threads": None}
    for key in ("steps", "loader_workers", "images_per_category"):
        if getattr(args, key) is not None:
            s[key] = getattr(args, key)
    if s["steps"] < 1 or s["loader_workers"] < 0 or s["images_per_category"] < 2:
        raise UsageError("--steps must be >= 1, --loader-workers >= 0 and --images-per-category >= 2")
    return s


# --- the data -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Data:
    """The folders a suite runs on: given (``--data-root``, ``--shards``, ``--embeddings``) or made in the work
    folder (``made`` names those the suite makes: ``synthetic``, ``shards``, ``embeddings``)."""

    root: Path
    shards: Path
    embeddings: Path
    made: tuple[str, ...]

    def entry(self, s: dict[str, Any]) -> dict[str, Any]:
        """The JSON's ``data``: the given folders (null: made by the suite in its work folder), what it made,
        the synthetic set's size when it made one; ``samples`` (the shards' annotations, from their manifest)
        is filled in once the shards are there."""
        synthetic = "synthetic" in self.made
        return {
            "data_root": None if synthetic else str(self.root),
            "shards": None if "shards" in self.made else str(self.shards),
            "embeddings": None if "embeddings" in self.made else str(self.embeddings),
            "made": list(self.made),
            "synthetic": {"categories": CATEGORIES, "images_per_category": s["images_per_category"],
                          "images": CATEGORIES * s["images_per_category"], "mp100_sized": s["mp100_sized"]}
            if synthetic else None,
            "samples": None,
        }


def check_data(args: argparse.Namespace) -> None:
    """``--data-root``, ``--shards`` and ``--embeddings`` go together as documented and name existing folders;
    one line otherwise."""
    if (args.shards is None) != (args.embeddings is None):
        raise UsageError("--shards and --embeddings go together: existing shards and the tables made from them, "
                         "both used instead of the shard and embedding jobs")
    if args.shards is not None and args.data_root is None:
        raise UsageError("--shards and --embeddings need --data-root, the MP-100 copy the shards were made from "
                         "(the predict and serve smokes read an image from it)")
    if args.data_root is not None and args.images_per_category is not None:
        raise UsageError("--images-per-category sizes the synthetic set, which --data-root replaces: not both")
    for flag in ("data_root", "shards", "embeddings"):
        folder = getattr(args, flag)
        if folder is not None and not folder.is_dir():
            raise UsageError(f"--{flag.replace('_', '-')} {folder}: no such folder")
    if args.data_root is not None:
        need = ("images",) if args.shards is not None else ("images", "annotations")
        for sub in need:
            if not (args.data_root / sub).is_dir():
                raise UsageError(f"--data-root {args.data_root}: no {sub}/ folder (expected the MP-100 layout: "
                                 "images/ and annotations/)")


def plan_data(args: argparse.Namespace, work: Path) -> Data:
    """Where each folder is: the given one, or the one the suite makes in ``work``."""
    made = (("synthetic",) if args.data_root is None else ()) + (("shards", "embeddings") if args.shards is None
                                                                  else ())
    return Data(root=(args.data_root or work / "data").resolve(), shards=(args.shards or work / "shards").resolve(),
                embeddings=(args.embeddings or work / "emb").resolve(), made=made)


def check_tables_fit(args: argparse.Namespace, s: dict[str, Any], data: Data) -> None:
    """``--shards`` and ``--embeddings``: refuse, in one line, what ``jobs.train`` would refuse (no manifest,
    tables of another config or of other shards), with the config the suite's training run resolves."""
    import jobs.train
    from capenext.data.embeddings import check_tables, needs_image_table
    from capenext.data.mp100 import DataError
    from capenext.data.shards import ShardIndex
    from jobs.training.spec import resolve_config

    cfg = resolve_config(jobs.train.parse_args([str(a) for a in train_argv(args, s, data, Path("runs"))]))
    try:
        index = ShardIndex(data.shards, descriptions=cfg.data.descriptions, text_variant=cfg.data.text_variant)
    except (OSError, DataError) as err:
        raise UsageError(f"--shards: {err}") from None
    remake = (f"python -m pipelines.embed --shards {data.shards} --out {data.embeddings} --config {s['preset']} "
              "--clip-checkpoint random")
    try:
        check_tables(data.embeddings, cfg, index.digest, images=needs_image_table(cfg), remake=remake)
    except (OSError, ValueError) as err:
        raise UsageError(f"--embeddings: {err}") from None


# --- Ray, when something needs it --------------------------------------------------------------------------


class RayInstance:
    """The suite's local Ray instance, started the first time something needs it (the shard and embedding
    jobs, the serve smoke); from then on ``RAY_ADDRESS`` in ``env`` (the subprocesses' environment) names it."""

    def __init__(self, env: dict[str, str], cpus: int) -> None:
        self.env, self.cpus = env, cpus
        self.needed_by: list[str] = []
        self.start_seconds: float | None = None
        self._ray: ModuleType | None = None

    def need(self, what: str) -> None:
        self.needed_by.append(what)
        if self._ray is not None:
            return
        import ray

        start, before = time.perf_counter(), dict(os.environ)
        ctx = ray.init(address="local", num_cpus=self.cpus, log_to_driver=False, include_dashboard=False,
                       logging_level="ERROR")
        self._ray = ray
        self.start_seconds = round(time.perf_counter() - start, 1)
        # what ray.init set in this process's environment (RAY_AUTH_MODE=token: a subprocess without it
        # cannot connect) goes to the subprocesses too, with the instance's address
        self.env.update({k: v for k, v in os.environ.items() if before.get(k) != v})
        self.env["RAY_ADDRESS"] = ctx.address_info["gcs_address"]

    def stop(self) -> None:
        if self._ray is not None:
            with contextlib.suppress(Exception):
                self._ray.shutdown()

    def entry(self) -> dict[str, Any]:
        return {"started": self._ray is not None, "needed_by": self.needed_by, "start_seconds": self.start_seconds}


# --- sampling while a run goes on -------------------------------------------------------------------------


def _cpu_jiffies() -> tuple[float, float] | None:
    """(busy, total) CPU time of the whole machine so far, in clock ticks (``/proc/stat``)."""
    try:
        fields = [float(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0.0)  # idle + iowait
    return sum(fields) - idle, sum(fields)


class Sampler:
    """GPU utilisation every half second (``nvidia-smi``) and the machine's CPU use between start and stop
    (``psutil.cpu_percent`` when installed, else ``/proc/stat``), in a thread."""

    def __init__(self, gpu: bool) -> None:
        self.gpu = gpu and shutil.which("nvidia-smi") is not None
        self.samples: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while not self._stop.wait(0.5):
            with contextlib.suppress(Exception):
                out = subprocess.run(["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits"],
                                     capture_output=True, text=True, timeout=5).stdout
                self.samples.append(float(out.split()[0]))

    def __enter__(self) -> Sampler:
        try:
            import psutil

            psutil.cpu_percent(percpu=True)
            self._psutil = psutil
        except ImportError:
            self._psutil = None
        self._jiffies = _cpu_jiffies()
        if self.gpu:
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self.gpu:
            self._thread.join(timeout=10)
        if self._psutil is not None:
            self.cores_busy = sum(self._psutil.cpu_percent(percpu=True)) / 100
        else:
            end, start = _cpu_jiffies(), self._jiffies
            self.cores_busy = None
            if start is not None and end is not None and end[1] > start[1]:
                self.cores_busy = (end[0] - start[0]) / (end[1] - start[1]) * (os.cpu_count() or 1)

    def gpu_utilisation(self) -> dict[str, float] | None:
        if not self.samples:
            return None
        return {"mean_percent": round(sum(self.samples) / len(self.samples), 1),
                "max_percent": max(self.samples), "samples": len(self.samples)}


# --- subprocesses ---------------------------------------------------------------------------------------


class Runner:
    """Runs ``python -m MODULE ...`` in the work folder with the suite's environment; logs each command's
    output to ``logs/NAME.log`` and remembers its wall time."""

    def __init__(self, workdir: Path, env: dict[str, str]) -> None:
        self.workdir, self.env = workdir, env
        self.logs = workdir / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.seconds: dict[str, float] = {}

    def __call__(self, name: str, module: str, *argv: Any, timeout: float = 900) -> str:
        cmd = [sys.executable, "-m", module, *map(str, argv)]
        start = time.perf_counter()
        try:
            proc = subprocess.run(cmd, cwd=self.workdir, env=self.env, capture_output=True, text=True,
                                  timeout=timeout)
        except subprocess.TimeoutExpired:
            raise RuntimeError(f"{module} ran past {timeout:.0f} s") from None
        finally:
            self.seconds[name] = round(time.perf_counter() - start, 1)
        (self.logs / f"{name}.log").write_text(f"$ {' '.join(cmd)}\n{proc.stdout}\n{proc.stderr}")
        if proc.returncode != 0:
            raise RuntimeError(f"{module} exited {proc.returncode}: {last_line(proc.stderr or proc.stdout)}")
        return proc.stdout

    def inline(self, name: str, what: str, fn: Callable[[], Any]) -> str:
        """``fn()``, a job's public ``run`` or ``main``, in this process (no interpreter start, the suite's
        Ray instance reused); what it prints (and a line it returns) is returned and logged. A non-zero
        exit code it returns is a failure."""
        import io

        buf = io.StringIO()
        start = time.perf_counter()
        try:
            with contextlib.redirect_stdout(buf):
                value = fn()
            if isinstance(value, str):
                print(value, file=buf)
        finally:
            self.seconds[name] = round(time.perf_counter() - start, 1)
            (self.logs / f"{name}.log").write_text(f"$ {what}\n{buf.getvalue()}")
        if isinstance(value, int) and value:
            raise RuntimeError(f"{what} returned {value}: {last_line(buf.getvalue())}")
        return buf.getvalue()

    def main(self, name: str, job: ModuleType, *argv: Any) -> str:
        """``job.main(argv)`` (a job module's public entry) in this process, as :meth:`inline`."""
        args = [str(a) for a in argv]
        return self.inline(name, f"python -m {job.__name__} {' '.join(args)}", lambda: job.main(args))


def last_line(text: str) -> str:
    """The most telling line of a failed command's output: its ``error:`` line, else its last one."""
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("error:") or re.match(r"^[\w.]+(Error|Exception)\b", ln)]
    return ((errors or lines or ["no output"])[-1])[:300]


class Smokes(dict):
    """The smokes' results by name; those named in ``skip`` are not run (and not in the results)."""

    def __init__(self, skip: tuple[str, ...] = ()) -> None:
        super().__init__()
        self.skip = skip


def smoke(results: Smokes, name: str, fn) -> Any:
    """Run one smoke; record ``ok`` or ``failed`` with its one-line reason, and its wall time (none of it for
    a smoke the results skip)."""
    if name in results.skip:
        return None
    start = time.perf_counter()
    try:
        value = fn()
        results[name] = {"status": "ok", "detail": value if isinstance(value, str) else None}
    except Exception as err:  # a failed smoke is a result, the suite goes on
        results[name] = {"status": "failed", "detail": " ".join(str(err).split())[:300] or type(err).__name__}
        value = None
    results[name]["seconds"] = round(time.perf_counter() - start, 1)
    return value


# --- sections -------------------------------------------------------------------------------------------


def model_section(args: argparse.Namespace, s: dict[str, Any]) -> dict[str, Any]:
    """The model benchmark at each batch size: eager, ``torch.compile`` and fused Adam."""
    variants = {"eager": {}, "compile": {"compile": True}, "fused_adam": {"fused_adam": True}}
    out: dict[str, Any] = {"backbone": s["backbone"], "preset": s["preset"], "runs": []}
    for batch in s["batches"]:
        for variant, flags in variants.items():
            if variant == "compile" and batch not in s["compile_batches"]:
                continue
            opts = ModelBenchmark(device=args.device, backbone=s["backbone"], batch_size=batch,
                                  preset=s["preset"], ablation="full", steps=s["bench_steps"],
                                  rounds=s["bench_rounds"], warmup=s["bench_warmup"], threads=s["threads"],
                                  compile_backend=s["compile_backend"],
                                  **{"compile": False, "fused_adam": False, **flags})
            start = time.perf_counter()
            r = benchmark_model(opts)
            out["runs"].append({
                "batch_size": batch, "variant": variant, "precision": r["precision"],
                "train_img_per_s": r["train_img_per_s"], "peak_memory_mb": r["peak_memory_mb"],
                "ratio_full_precomputed_vs_backbone": r["ratio_vs_backbone"]["full_precomputed"],
                "ratio_full_online_vs_backbone": r["ratio_vs_backbone"]["full_online"],
                "goal_met": r["goal_met"], "seconds": round(time.perf_counter() - start, 1)})
            if args.device == "cuda":
                torch.cuda.empty_cache()
    out["goal_full_precomputed_ratio"] = GOAL_RATIO
    out["precision"] = out["runs"][0]["precision"]
    out["peak_memory_kind"] = ("cuda max_memory_allocated per configuration" if args.device == "cuda"
                               else "process peak RSS (cumulative)")
    return out


def steps_per_epoch(shards: Path, batch: int) -> int:
    """Optimizer steps one epoch of split 1 has on these shards (as ``jobs.train`` counts them)."""
    from capenext.data import training_pairs
    from capenext.data.shards import ShardIndex

    train = ShardIndex(shards).subset(1, "train")
    return len(training_pairs(train.by_category(), 0, 0)) // batch


def prepare_data(args: argparse.Namespace, s: dict[str, Any], run: Runner, data: Data, ray: RayInstance,
                 smokes: Smokes) -> None:
    """What ``data`` says the suite makes: the synthetic set (``python -m pipelines.synthetic``), the shards
    and the embeddings (the shard and embedding jobs' public ``run``, in this process, on the suite's Ray);
    the embedding job is the ``embed`` smoke."""
    from capenext.config import resolve
    from pipelines import embed, shard

    if "synthetic" in data.made:
        gen = ["--out", data.root, "--categories", CATEGORIES, "--images-per-category", s["images_per_category"],
               "--quiet"]
        run("synthetic", "pipelines.synthetic", *gen, *(["--mp100-sized"] if s["mp100_sized"] else []))
    if "shards" not in data.made:
        return

    def shard_job() -> str:
        manifest = shard.run(data.root, data.shards, progress=False)
        return f"{manifest['samples']} samples in {len(manifest['shards'])} shards"

    def embed_job() -> str:
        cfg = resolve(s["preset"], {"model.clip_checkpoint": "random"}, [])
        counts = embed.run(data.shards, data.embeddings, cfg, progress=False, device=args.device)["counts"]
        return (f"{counts['images']} images, {counts['classes']} classes, {counts['keypoints']} keypoint texts "
                f"(CLIP actors on {args.device})")

    ray.need("shard")
    run.inline("shard", f"pipelines.shard.run({data.root}, {data.shards})", shard_job)

    def embed_smoke() -> str:
        ray.need("embed")
        return last_line(run.inline("embed", f"pipelines.embed.run({data.shards}, {data.embeddings}, config "
                                             f"{s['preset']}, clip random, device {args.device})", embed_job))

    smoke(smokes, "embed", embed_smoke)
    if smokes["embed"]["status"] != "ok":
        raise RuntimeError(f"the embedding job failed: {smokes['embed']['detail']}")


def train_argv(args: argparse.Namespace, s: dict[str, Any], data: Data, runs: Path) -> list[Any]:
    """The command line of the suite's training runs (less the run name, epochs, steps and loader workers)."""
    return ["--split", 1, "--ablation", "full", "--backbone", s["backbone"], "--config", s["preset"],
            "--clip-checkpoint", "random", "--shards", data.shards, "--embeddings", data.embeddings, "--local",
            "--val-every", 10**6, "--val-episodes", 1, "--episodes", 1, "--queries", 2, "--storage-path", runs,
            "--experiment", "gpu-suite", "--cpus-per-worker", max(1, (os.cpu_count() or 1) // 2),
            *(["--batch-size", s["train_batch"]] if s["train_batch"] else []), "--device", args.device]


def training_section(args: argparse.Namespace, s: dict[str, Any], run: Runner, work: Path, data: Data,
                     ray: RayInstance, smokes: Smokes) -> tuple[dict[str, Any], Path | None]:
    """(Synthetic set → shards → embeddings, as far as ``data`` says) → a short training run, measured; the final
    checkpoint."""
    from capenext.config import load_preset

    prepare_data(args, s, run, data, ray, smokes)
    batch = s["train_batch"] or load_preset(s["preset"]).optim.batch_size
    natural = steps_per_epoch(data.shards, batch)
    if natural < 1:
        raise RuntimeError(f"split 1 has fewer training pairs than one batch of {batch}")
    per_epoch = min(natural, s["steps"] if s["steps"] < 2 else max(1, s["steps"] // 2))
    epochs = math.ceil(s["steps"] / per_epoch)
    train_args = train_argv(args, s, data, work / "runs")
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    with Sampler(args.device == "cuda") as sampler:
        log = run("train", "jobs.train", *train_args, "--run-name", "bench", "--epochs", epochs,
                  "--max-steps", per_epoch, "--loader-workers", s["loader_workers"], timeout=1800)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    epochs_img_s = [float(m.group(3)) for m in EPOCH_LINE.finditer(log)]
    if not epochs_img_s:
        raise RuntimeError("the training run printed no epoch line")
    steady = sorted(epochs_img_s[1:] or epochs_img_s)
    img_s = steady[len(steady) // 2]  # the median epoch after the first (which warms up)
    hours = EPOCHS * PAIRS_PER_EPOCH / img_s / 3600
    section = {
        "backbone": s["backbone"], "preset": s["preset"], "batch_size": batch, "epochs": epochs,
        "steps_per_epoch": per_epoch, "steps": epochs * per_epoch, "loader_workers": s["loader_workers"],
        "epoch_img_per_s": epochs_img_s, "img_per_s": round(img_s, 2),
        "img_per_s_source": "median of the run's epoch lines after the first (train/img_per_s)",
        "gpu_utilisation": sampler.gpu_utilisation(),
        "cpu_cores_busy_machine": None if sampler.cores_busy is None else round(sampler.cores_busy, 2),
        "cpu_cores_used_by_run": round((after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime)
                                       / max(wall, 1e-9), 2),
        "run_seconds": round(wall, 1),
        "projected_hours_200_epochs": round(hours, 3),
        "projection": f"{EPOCHS} epochs x {PAIRS_PER_EPOCH} pairs / img_per_s",
        "goal_hours": GOAL_HOURS, "goal_met": hours <= GOAL_HOURS,
    }
    final = work / "runs" / "bench" / "artifacts" / "final.pt"

    def online() -> str:
        out = run("train_online", "jobs.train", *train_args, "--run-name", "online", "--image-embedding", "online",
                  "--epochs", 1, "--max-steps", 2, "--loader-workers", 0, timeout=900)
        found = EPOCH_LINE.findall(out)
        if not found:
            raise RuntimeError("the online run printed no epoch line")
        return f"1 epoch of 2 steps, {found[-1][2]} img/s"

    smoke(smokes, "train_online", online)
    return section, final if final.is_file() else None


def _multipart(fields: dict[str, str], image: Path) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    parts = [f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode()
             for k, v in fields.items()]
    parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="{image.name}"\r\n'
                 "Content-Type: image/jpeg\r\n\r\n".encode() + image.read_bytes() + b"\r\n")
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def _start_server(cmd: list[str], run: Runner, log) -> subprocess.Popen | str:
    """``jobs.serve`` started and serving (its line read), or why it exited before it served."""
    proc = subprocess.Popen(cmd, cwd=run.workdir, env=run.env, stdout=subprocess.PIPE, stderr=log, text=True)
    started = time.perf_counter()
    for line in proc.stdout:
        log.write(line)
        if line.startswith("CapeNext is serving"):
            return proc
        if time.perf_counter() - started > 240:
            _stop(proc)
            raise RuntimeError("jobs.serve did not come up within 240 s")
    proc.wait(timeout=60)
    log.flush()
    return (f"jobs.serve exited {proc.returncode} after {time.perf_counter() - started:.1f} s before serving: "
            f"{last_line((run.logs / 'serve.log').read_text())}")


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM (the server stops as on Ctrl-C), SIGKILL after a minute."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def serve_smoke(run: Runner, checkpoint: Path, image: Path, device: str) -> str:
    """Start ``jobs.serve``, send one prediction request, stop it with SIGTERM (as Ctrl-C). A server that
    exits before it serves is started once more; the answer says so."""
    port = free_port()
    cmd = [sys.executable, "-m", "jobs.serve", "--checkpoint", str(checkpoint), "--device", device,
           "--port", str(port), "--cpus-per-replica", "1"]
    with open(run.logs / "serve.log", "w") as log:
        proc = _start_server(cmd, run, log)
        note = ""
        if isinstance(proc, str):
            note = f" (second start; the first: {proc})"
            proc = _start_server(cmd, run, log)
            if isinstance(proc, str):
                raise RuntimeError(proc)
        try:
            body, ctype = _multipart({"keypoints": "nose,left eye", "class": "cat"}, image)
            req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/predict", data=body,
                                         headers={"Content-Type": ctype})
            with urllib.request.urlopen(req, timeout=120) as r:
                answer = json.loads(r.read())
            if len(answer.get("keypoints", [])) != 2:
                raise RuntimeError(f"unexpected answer: {json.dumps(answer)[:200]}")
            return f"one request answered with {len(answer['keypoints'])} keypoints{note}"
        finally:
            _stop(proc)
            log.write(proc.stdout.read() or "")


def clip_fp16_smoke(device: str, quick: bool) -> str:
    """fp16 CLIP (the reference's GPU precision) against fp32 on the same random weights."""
    from capenext.models.clip import FrozenCLIP

    name = "tiny" if quick else "ViT-B-32"
    full = FrozenCLIP(name, "random", precision="fp32").to(device)
    half = FrozenCLIP(name, "random", precision="fp16").to(device)
    texts = ["left eye", "tip of the spout", "left front paw", "a photo of a cat"]
    if device != "cuda":
        try:
            half.encode_text(texts)
        except ValueError as err:
            if "CUDA device only" in str(err):
                return f"fp16 refused on {device}, as documented"
        raise RuntimeError(f"fp16 CLIP on {device} was not refused in one line")
    img = torch.randn(2, 3, *full.image_size, generator=torch.Generator().manual_seed(0)).to(device)
    cos = {"texts": (full.encode_text(texts) * half.encode_text(texts)).sum(-1).min().item(),
           "images": (full.encode_image(img) * half.encode_image(img)).sum(-1).min().item()}
    if min(cos.values()) < 0.99:
        raise RuntimeError(f"fp16 and fp32 CLIP {name} disagree: min cosine {cos}")
    return f"{name} fp16 vs fp32 min cosine: texts {cos['texts']:.5f}, images {cos['images']:.5f}"


def first_image(data: Path) -> Path:
    found = next((p for p in sorted((data / "images").rglob("*")) if p.suffix.lower() in (".jpg", ".jpeg", ".png")),
                 None)
    if found is None:
        raise RuntimeError(f"no .jpg or .png image under {data / 'images'}")
    return found


def job_smokes(args: argparse.Namespace, run: Runner, work: Path, data: Data, ray: RayInstance,
               checkpoint: Path | None, smokes: Smokes) -> None:
    """``jobs.evaluate``, ``jobs.predict`` and ``jobs.serve`` on the device, with the run's checkpoint (the
    server on the suite's Ray, started for it if nothing started it before)."""
    def need() -> Path:
        if checkpoint is None:
            raise RuntimeError("no checkpoint: the training run did not finish")
        return checkpoint

    from jobs import evaluate, predict

    def evaluate_smoke() -> str:
        out = run.main("evaluate", evaluate, "--checkpoint", need(), "--shards", data.shards, "--split", 1,
                       "--embeddings", data.embeddings, "--episodes", 1, "--queries", 2, "--device", args.device,
                       "--no-mlflow", "--pictures", 0, "--out", work / "evaluation", "--quiet")
        return last_line(out)

    def predict_smoke() -> str:
        out = run.main("predict", predict, "--checkpoint", need(), "--image", first_image(data.root),
                       "--keypoints", "nose,left eye", "--class", "cat", "--device", args.device,
                       "--out", work / "prediction")
        return last_line(out)

    def serve() -> str:
        checkpoint, image = need(), first_image(data.root)
        ray.need("serve")
        return serve_smoke(run, checkpoint, image, args.device)

    smoke(smokes, "evaluate", evaluate_smoke)
    smoke(smokes, "predict", predict_smoke)
    if (Path(__file__).parent / "serve.py").is_file():
        smoke(smokes, "serve", serve)


# --- the suite ------------------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> dict[str, Any]:
    if args.device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA device is visible here (use --device cpu --quick for the "
                         "CPU version of the suite)")
    s = settings(args)
    skip = skipped_smokes(args.skip_smokes)
    check_data(args)
    keep = args.workdir is not None
    work = (args.workdir or Path(tempfile.mkdtemp(prefix="capenext-gpu-suite-"))).resolve()
    data = plan_data(args, work)
    try:
        if "embeddings" not in data.made:
            check_tables_fit(args, s, data)
        return _suite(args, s, skip, work, data)
    finally:
        if not keep:
            shutil.rmtree(work, ignore_errors=True)


def _suite(args: argparse.Namespace, s: dict[str, Any], skip: tuple[str, ...], work: Path,
           data: Data) -> dict[str, Any]:
    started = time.perf_counter()
    result: dict[str, Any] = {"benchmark": "gpu-suite", "device": args.device, "quick": bool(args.quick),
                              "machine": machine(), "torch": torch.__version__,
                              "cuda": torch.version.cuda if args.device == "cuda" else None,
                              "data": data.entry(s)}
    if "embeddings" not in data.made:  # given tables: the embedding job (the embed smoke) is not run
        skip = ("embed", *skip)
    work.mkdir(parents=True, exist_ok=True)
    result["model"] = model_section(args, s)
    smokes = Smokes(skip=skip)
    smoke(smokes, "clip_fp16", lambda: clip_fp16_smoke(args.device, args.quick))

    cpus = max(2, os.cpu_count() or 1)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # set once the suite's Ray is started
    env.update({"PYTHONUNBUFFERED": "1", "MLFLOW_TRACKING_URI": f"sqlite:///{work / 'mlflow.db'}",
                "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", str(max(1, cpus // 2)))})
    runner = Runner(work, env)
    ray = RayInstance(env, cpus)
    try:
        try:
            result["training"], checkpoint = training_section(args, s, runner, work, data, ray, smokes)
        except Exception as err:  # recorded; the smokes that need no checkpoint still ran
            result["training"], checkpoint = {"status": "failed", "detail": " ".join(str(err).split())[:300]}, None
        from capenext.data.shards import read_manifest

        with contextlib.suppress(Exception):  # the shards given or made (if the suite got that far)
            result["data"]["samples"] = read_manifest(data.shards)["samples"]
        job_smokes(args, runner, work, data, ray, checkpoint, smokes)
        result["stage_seconds"] = runner.seconds
    finally:
        ray.stop()
    result["ray"] = ray.entry()
    result["smoke"] = dict(smokes)
    result["skipped_smokes"] = sorted(smokes.skip)
    result["all_smokes_ok"] = all(v["status"] == "ok" for v in smokes.values())
    result["total_seconds"] = round(time.perf_counter() - started, 1)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    summary(result)
    return result


def summary(result: dict[str, Any]) -> None:
    """The goals, in words, on stderr (stdout carries the JSON)."""
    for r in result["model"]["runs"]:
        print(f"model batch {r['batch_size']:>4} {r['variant']:<10} full(precomputed)/backbone "
              f"{r['ratio_full_precomputed_vs_backbone']:.3f} (goal >= {GOAL_RATIO}: "
              f"{'met' if r['goal_met'] else 'not met'})", file=sys.stderr)
    t = result.get("training", {})
    if "img_per_s" in t:
        print(f"training {t['img_per_s']} img/s: {EPOCHS} epochs of {PAIRS_PER_EPOCH} pairs in "
              f"{t['projected_hours_200_epochs']} h (goal <= {GOAL_HOURS} h: {'met' if t['goal_met'] else 'not met'})",
              file=sys.stderr)
    for name, v in result["smoke"].items():
        print(f"smoke {name:<13} {v['status']}" + (f": {v['detail']}" if v["status"] != "ok" else ""),
              file=sys.stderr)
