"""Ray start-up and sizing, for every job that runs on Ray."""

from __future__ import annotations

import logging

from capenext.cli import UsageError


def init_ray(address: str | None = None, log_to_driver: bool = False):
    """Reuse an initialised Ray; else ``ray.init(address)``, quietly.

    ``address=None`` is ``ray.init()``'s own lookup: ``RAY_ADDRESS`` (set by ``ray job submit``), a cluster
    started with ``ray start`` on this machine, else a new local instance. The dashboard stays on: Ray
    Train's State API (placement-group cleanup) needs it.
    """
    import ray

    if not ray.is_initialized():
        ray.init(address=address, log_to_driver=log_to_driver, logging_level=logging.ERROR)
    return ray


def check_cluster(num_workers: int, cpus_per_worker: float, gpu: bool) -> None:
    """Fail fast when the cluster cannot hold the workers asked for (instead of waiting forever)."""
    import ray

    total = ray.cluster_resources()
    need_cpu = num_workers * cpus_per_worker
    if need_cpu > total.get("CPU", 0):
        raise UsageError(f"asked for {num_workers} workers x {cpus_per_worker} CPUs = {need_cpu:g} CPUs, "
                         f"the Ray cluster has {total.get('CPU', 0):g}: lower --num-workers or --cpus-per-worker")
    if gpu and num_workers > total.get("GPU", 0):
        raise UsageError(f"asked for {num_workers} GPU workers (--device cuda), the Ray cluster has "
                         f"{total.get('GPU', 0):g} GPUs")
