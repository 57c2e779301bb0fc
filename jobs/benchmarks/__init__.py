"""The benchmarks behind ``python -m jobs.benchmark {model,loader,embed,serve,gpu-suite}``: each module
measures one thing against a baseline measured in the same run and returns JSON-ready dicts."""

from __future__ import annotations

import os
from typing import Any


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
