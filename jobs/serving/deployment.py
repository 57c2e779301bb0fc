"""The Ray Serve side of :mod:`jobs.serve`: the ``CapeNext`` deployment, the application builder and the
checks made where the application is built.

One deployment, ``CapeNext``: each replica is a :class:`jobs.serving.app.Service` (the predictor, loaded in
the constructor, so a replica is routable only once it can answer) serving :func:`jobs.serving.app.build_web_app`'s
FastAPI app as its ingress. Concurrent requests meet in ``@serve.batch``; the batching settings are the
deployment's ``user_config``, so ``serve deploy`` changes them without restarting replicas.

Backpressure: a replica admits ``--max-ongoing-requests`` requests to work and ``--max-queued-requests`` to
wait, and answers the next ones at once with a 503 in JSON and ``Retry-After`` (:class:`jobs.serving.app.Gate`);
Serve hands a replica up to :attr:`~jobs.serving.options.ServeOptions.replica_capacity` requests, so that
those refusals come from the replica. Serve's own ``max_queued_requests`` bounds what waits in the proxy; Serve
counts there every request not yet taken in by a replica, those on their way to it included, so it is that
capacity too: a burst the replica can take in is not refused in the proxy while it travels (on a loaded machine
a bound of ``--max-queued-requests`` refused part of a burst of 40 there). A request past it gets Serve's own
503 (plain text, also with ``Retry-After``).
"""

from __future__ import annotations

import socket
import tempfile
from pathlib import Path
from typing import Any

from ray import serve

from jobs.serving.app import Service
from jobs.serving.limits import RETRY_AFTER_S
from jobs.serving.options import DEPLOYMENT_NAME, ServeOptions, autoscale_bounds
from jobs.serving.page import read_page
from jobs.serving.web import build_web_app

_replica: dict[str, Service] = {}  # this process's replica (Ray runs each replica in its own process)


def _register_replica(service: Service) -> None:
    # a module function: the deployment class travels to the replica by value, with copies of the globals
    # it names, while this function (and _replica_web_app) are imported there and share the real _replica
    _replica["service"] = service


def _replica_web_app():
    """Serve calls this in the replica right after the deployment's constructor: the app around it."""
    return build_web_app(_replica["service"])


@serve.deployment(name=DEPLOYMENT_NAME, health_check_period_s=10, health_check_timeout_s=30,
                  graceful_shutdown_timeout_s=20)
@serve.ingress(_replica_web_app)
class CapeNext(Service):
    """One replica: the predictor (loaded here, so the replica is routable only once it can answer),
    batched forwards and the web app."""

    def __init__(self, options: dict[str, Any], page: dict[str, Any] | None = None):
        super().__init__(ServeOptions(**options), page)
        _register_replica(self)

    def reconfigure(self, config: dict[str, Any]) -> None:
        """``user_config``: ``{"max_batch_size": N, "batch_wait_ms": T}``, changed without a restart."""
        batching = ServeOptions(checkpoint="-", **{k: config[k] for k in ("max_batch_size", "batch_wait_ms")
                                                   if k in config})
        self.forward.set_max_batch_size(batching.max_batch_size)
        self.forward.set_batch_wait_timeout_s(batching.batch_wait_ms / 1000)

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.005)  # reconfigure() sets both
    async def forward(self, queries: list) -> list[list[dict[str, Any]]]:
        return await self.run_model(queries)

    def check_health(self) -> None:
        if getattr(self, "predictor", None) is None:
            raise RuntimeError("no model loaded")


def build_application(options: ServeOptions, page: dict[str, Any] | None = None):
    """The Serve application for ``options`` (``page``: :func:`read_page`'s, read here when not given)."""
    if page is None:
        page = read_page(options.data_root, options.split)
    deployment_options: dict[str, Any] = {
        "ray_actor_options": {"num_cpus": options.cpus_per_replica, "num_gpus": options.gpus},
        # the replica queues (and refuses, in JSON) itself; Serve's own queue is the backstop past that
        "max_ongoing_requests": options.replica_capacity,
        "max_queued_requests": options.replica_capacity,
        "backpressure_config": {"status_code": 503, "retry_after_s": RETRY_AFTER_S},
        "user_config": {"max_batch_size": options.max_batch_size, "batch_wait_ms": options.batch_wait_ms},
    }
    if options.autoscale:
        lo, hi = autoscale_bounds(options.autoscale)
        deployment_options["autoscaling_config"] = {
            "min_replicas": lo, "max_replicas": hi, "initial_replicas": max(lo, 1),
            "target_ongoing_requests": max(1, options.max_batch_size)}
    else:
        deployment_options["num_replicas"] = options.replicas
    # batching lives in user_config only, so that changing it reconfigures replicas instead of replacing them
    init = options.model_dump(exclude={"max_batch_size", "batch_wait_ms"})
    return CapeNext.options(**deployment_options).bind(init, page)


def check_checkpoint(options: ServeOptions) -> None:
    """Read the checkpoint once where the application is built, so that a missing or unreadable one fails
    there, in one line, and not in every replica; with ``runtime="onnx"``, check the ``onnx`` folder against
    it too (:func:`check_onnx`)."""
    from capenext.checkpoint import read_checkpoint
    from jobs.runtime.checkpoints import resolve_checkpoint

    with tempfile.TemporaryDirectory(prefix="capenext-serve-") as tmp:
        path = resolve_checkpoint(options.checkpoint, options.tracking_uri, Path(tmp)).path
        read_checkpoint(path)
        if options.runtime == "onnx":
            check_onnx(options.onnx, path, options.checkpoint)


def check_onnx(folder: str, checkpoint: str | Path, spec: str) -> None:
    """The export folder ``folder`` is one every replica can run for the checkpoint file ``checkpoint``
    (``spec`` as the user gave it): onnxruntime installed, a ``model.json`` naming files that are there
    (:func:`capenext.export.read_meta`), and its ``checkpoint_sha256`` the checkpoint's, which is what
    :class:`capenext.export.OnnxModel` checks in each replica. One line naming ``--onnx`` otherwise, before
    Serve starts; nothing is read beyond ``model.json`` and the checkpoint's bytes."""
    from capenext.cli import UsageError
    from capenext.export import META_FILE, read_meta
    from capenext.files import file_sha256

    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        raise UsageError("--runtime onnx needs onnxruntime: pip install 'capenext[onnx]'") from None
    try:
        meta = read_meta(folder)
    except (FileNotFoundError, ValueError) as err:
        raise UsageError(f"--onnx {err}") from None
    exported, given = str(meta.get("checkpoint_sha256")), file_sha256(checkpoint)
    if exported != given:
        raise UsageError(f"--onnx {folder}: exported from another checkpoint (its {META_FILE} has sha256 "
                         f"{exported[:12]}..., --checkpoint {spec} has {given[:12]}...): export this one with "
                         f"python -m jobs.export --checkpoint {spec} --out DIR")


def port_free(host: str, port: int) -> bool:
    """Whether nothing listens on the port. SO_REUSEADDR, as Serve's proxy binds it: connections of a server
    stopped a moment ago, still in TIME_WAIT, do not block the port; a listening socket does."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
            return True
        except OSError:
            return False
