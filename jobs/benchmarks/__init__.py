"""The benchmarks behind ``python -m jobs.benchmark {model,loader,embed,serve,evaluate,predict,text-prior,gpu-suite}``:
each module measures one thing against a baseline measured in the same run and returns JSON-ready dicts."""

from __future__ import annotations

import argparse
import os
from typing import Any


def sizes(args: argparse.Namespace, quick: dict[str, Any], full: dict[str, Any]) -> dict[str, Any]:
    """A benchmark's sizes: each flag given (``args.<key>`` not None), else ``quick``'s value with ``--quick``,
    else ``full``'s. The caller checks the ranges."""
    return {k: v if getattr(args, k) is None else getattr(args, k) for k, v in (quick if args.quick else full).items()}


def machine() -> dict[str, Any]:
    """CPU model (``lscpu``'s "Model name"), core count and the GPU when one is visible: every benchmark's
    JSON says what it ran on."""
    import contextlib
    import platform
    import subprocess

    import torch

    model = platform.processor() or "unknown"
    with contextlib.suppress(Exception):
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        model = next(ln.split(":", 1)[1].strip() for ln in out.splitlines() if ln.startswith("Model name"))
    info: dict[str, Any] = {"cpu": model, "cores": os.cpu_count()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info
