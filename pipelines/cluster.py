"""Ray start-up for the data pipelines (``pipelines.shard``, ``pipelines.embed``).

The training, evaluation and serving jobs start Ray through :mod:`jobs.runtime.cluster`, which also sizes
Train worker groups; the pipelines need only this, and a module here keeps them from importing ``jobs``.
"""

from __future__ import annotations

import logging


def start_ray(address: str | None = None):
    """Reuse an initialised Ray; else ``ray.init(address)`` quietly (``None``: ``RAY_ADDRESS``, a cluster
    started with ``ray start`` on this machine, else a new local instance). Returns the ``ray`` module."""
    import ray

    if not ray.is_initialized():
        ray.init(address=address, logging_level=logging.ERROR, log_to_driver=False)
    return ray
