"""CapeNext on Ray Serve: ``python -m jobs.serve --checkpoint X``, an HTTP API and a web page.

One deployment, ``CapeNext``: each replica holds one :class:`capenext.predict.Predictor` and serves a
FastAPI app (the ingress) with

* ``GET /healthz``: 200 ``{"status": "ok", "model": {...}, "replica": {"queries", "batches", "largest_batch"}}``
  once the replica has loaded the model (the counts are the answering replica's);
* ``GET /v1/model``: what is loaded (checkpoint, ablation, backbone, CLIP model, crop size, keypoint slots);
* ``POST /v1/predict``: a multipart form, ``image`` (file), ``keypoints`` (``nose,left eye`` or a JSON list),
  ``class``, optional ``skeleton`` (``0-1,1-2``) and ``bbox`` (``x,y,w,h`` in image pixels, default the whole
  image) → ``{"keypoints": [{"name", "x", "y", "score"}], "image": {"width", "height"}, "bbox", "class",
  "skeleton", "model": {...}}``, the numbers ``python -m jobs.predict`` prints for the same inputs;
  ``?picture=1`` answers the drawn PNG (:func:`capenext.viz.draw_keypoints`) instead;
* ``/``: a Gradio page on the same app (upload, names or a training category's names, class, skeleton,
  box; Run shows the picture and the JSON; examples from ``--data-root``'s held-out test categories).

Concurrent requests meet in ``@serve.batch``: up to ``--max-batch-size`` queries, waiting at most
``--batch-wait-ms`` for company, go through :meth:`Predictor.predict_many` as one forward (each query padded
to the model's keypoint slots, as the data layer pads). Batching settings are the deployment's
``user_config``, so ``serve deploy`` changes them without restarting replicas.

Safe by default: the proxy binds 127.0.0.1 unless ``--host`` says otherwise; nothing in a request is run or
unpickled (images are decoded by PIL after a pixel-count check, the rest is text); an upload over
``--max-upload-mb`` is refused with 413 while it streams in, an image over ``--max-pixels`` (a decompression
bomb) with 400 before it is decoded; a request waits at most ``--request-timeout-s`` (the proxy's timeout,
and the model's answer inside the replica, 503 past it). Every bad request is a 4xx with ``{"error": "<one
line>"}`` and the replica carries on.

The same application runs under Serve's own tools: ``serve run jobs.serve:app checkpoint=X`` (``app`` is an
application builder taking the options below as ``key=value``), ``serve deploy cluster/serve.yaml``, and
KubeRay's ``cluster/rayservice.yaml``. ``--checkpoint`` is anything :func:`jobs.common.resolve_checkpoint`
takes (a file, ``runs:/...``, a run id, ``models:/NAME@ALIAS``, ``models:/NAME/VERSION``); each replica
resolves it itself, so on a cluster the file or the MLflow store must be reachable from every node.

This module holds the options, the deployment, the application builder and the command line; the HTTP
layer (request parsing, limits, the FastAPI routes and the page) is :mod:`jobs.serve_app`.
"""

from __future__ import annotations

import argparse
import logging
import signal
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field, field_validator, model_validator
from ray import serve

from capenext.cli import UsageError, run_main
from jobs.common import CHECKPOINT_HELP
from jobs.serve_app import (  # noqa: F401  (jobs.serve's interface too)
    EXAMPLES,
    MB,
    ApiError,
    BodyTooLarge,
    Service,
    build_web_app,
    decode_image,
    display_name,
    flag,
    parse_box,
    parse_edges,
    parse_names,
    read_page,
)

APP_NAME = "capenext"
DEPLOYMENT_NAME = "CapeNext"
DEFAULT_PORT = 8000
STOP_TIMEOUT_S = 60.0  # the most Ctrl-C waits for Serve to stop its replicas (each gets 20 s) before Ray stops


# --- options -----------------------------------------------------------------------------------------


class ServeOptions(BaseModel):
    """Every option of the application; ``serve run jobs.serve:app key=value ...`` and the ``args`` of a
    Serve config are validated against it (the command line's flags are the same names with dashes)."""

    checkpoint: str
    tracking_uri: str | None = None  # MLflow store for runs:/ and models:/ (default MLFLOW_TRACKING_URI)
    clip_checkpoint: str | None = None  # where the frozen CLIP's weights are on the replicas' machines
    device: str = "cpu"
    replicas: int = Field(1, ge=1)
    autoscale: str | None = None  # "MIN,MAX" replicas, instead of a fixed count
    cpus_per_replica: float = Field(1.0, gt=0)
    gpus_per_replica: float | None = Field(None, ge=0)  # default: 1 with device cuda, else 0
    max_batch_size: int = Field(8, ge=1)
    batch_wait_ms: float = Field(5.0, ge=0)
    max_ongoing_requests: int | None = Field(None, ge=1)  # per replica; default max(2 x batch, 16)
    max_upload_mb: float = Field(20.0, gt=0)
    max_pixels: int = Field(40_000_000, ge=1)
    request_timeout_s: float = Field(60.0, gt=0)
    data_root: str | None = None  # an MP-100 layout: the page's categories and examples
    split: int = 1

    model_config = {"extra": "forbid"}

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        if v != "cpu" and not v.startswith("cuda"):
            raise ValueError(f"device {v!r}: cpu or cuda")
        return v

    @field_validator("autoscale")
    @classmethod
    def _autoscale(cls, v: str | None) -> str | None:
        if v is not None:
            autoscale_bounds(v)
        return v

    @model_validator(mode="after")
    def _gpus(self) -> "ServeOptions":
        gpus = self.gpus_per_replica
        if self.device.startswith("cuda") and gpus == 0:
            raise ValueError("device cuda needs gpus_per_replica > 0 (a replica sees only the GPUs Ray gives it)")
        if not self.device.startswith("cuda") and gpus:
            raise ValueError(f"gpus_per_replica {gpus:g} with device cpu: pass device cuda to use the GPU")
        return self

    @property
    def gpus(self) -> float:
        if self.gpus_per_replica is not None:
            return self.gpus_per_replica
        return 1.0 if self.device.startswith("cuda") else 0.0

    @property
    def ongoing(self) -> int:
        return self.max_ongoing_requests or max(2 * self.max_batch_size, 16)


def autoscale_bounds(text: str) -> tuple[int, int]:
    """``"MIN,MAX"`` → ``(MIN, MAX)`` replicas; one line when it is not ``0 <= MIN <= MAX, MAX >= 1``."""
    parts = [p.strip() for p in text.split(",")]
    if len(parts) != 2 or not all(p.isdigit() for p in parts):
        raise ValueError(f"autoscale {text!r} is not MIN,MAX (two whole numbers of replicas, e.g. 1,4)")
    lo, hi = int(parts[0]), int(parts[1])
    if lo > hi or hi < 1:
        raise ValueError(f"autoscale {text!r}: needs MIN <= MAX and MAX >= 1")
    return lo, hi


def options_error(err: Exception) -> str:
    """A pydantic ``ValidationError`` as one line: ``field: message; field: message``."""
    errors = getattr(err, "errors", None)
    if callable(errors):
        parts = []
        for e in errors():
            where = ".".join(str(x) for x in e.get("loc", ())) or "options"
            msg = str(e.get("msg", "")).removeprefix("Value error, ")
            parts.append(f"{where}: {msg}")
        return "; ".join(parts)
    return " ".join(str(err).split())


def check_options(values: dict[str, Any]) -> ServeOptions:
    """:class:`ServeOptions` from ``values``, made absolute where the application is built: a local
    checkpoint or CLIP file becomes its absolute path and the default MLflow store that of this working
    directory (replicas run elsewhere); one line for a bad option."""
    from jobs.tracking import tracking_uri

    try:
        options = ServeOptions(**values)
    except Exception as err:  # pydantic ValidationError
        raise UsageError(f"serve options: {options_error(err)}") from None
    changes: dict[str, Any] = {"tracking_uri": tracking_uri(options.tracking_uri)}
    for key in ("checkpoint", "clip_checkpoint"):
        value = getattr(options, key)
        if value and Path(value).is_file():
            changes[key] = str(Path(value).resolve())
    return options.model_copy(update=changes)


# --- the deployment ---------------------------------------------------------------------------------

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
        "max_ongoing_requests": options.ongoing,
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
    there, in one line, and not in every replica."""
    from capenext.checkpoint import read_checkpoint
    from jobs.common import resolve_checkpoint

    with tempfile.TemporaryDirectory(prefix="capenext-serve-") as tmp:
        read_checkpoint(resolve_checkpoint(options.checkpoint, options.tracking_uri, Path(tmp)).path)


def app(args: dict[str, Any]):
    """The application builder of ``serve run jobs.serve:app checkpoint=X [key=value ...]`` and of a Serve
    config's ``import_path``: ``args`` are :class:`ServeOptions` fields. A missing checkpoint fails here,
    before anything is deployed (Serve's CLI prints it with its traceback)."""
    options = check_options(dict(args))
    check_checkpoint(options)
    return build_application(options)


# --- the command line -------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    d = ServeOptions.model_fields
    p = argparse.ArgumentParser(
        prog="python -m jobs.serve",
        description="Serve a CapeNext checkpoint on Ray Serve: POST /v1/predict (multipart image + keypoint "
                    "names → points), GET /healthz, and a web page at /. Concurrent requests are batched into "
                    "one forward. Prints the URL when ready; Ctrl-C stops it.",
        epilog="examples:\n"
               "  python -m jobs.serve --checkpoint models:/capenext@champion\n"
               "  python -m jobs.serve --checkpoint final.pt --data-root quickstart_out/data --port 8080\n"
               "  python -m jobs.serve --checkpoint final.pt --device cuda --autoscale 1,4 --address auto\n"
               "  curl -F image=@cat.jpg -F keypoints='nose,left eye,right eye' -F class=cat "
               "http://127.0.0.1:8000/v1/predict\n"
               "the same app under Serve's CLI: serve run jobs.serve:app checkpoint=final.pt max_batch_size=16",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--checkpoint", required=True, help=CHECKPOINT_HELP)
    p.add_argument("--host", default="127.0.0.1",
                   help="address the HTTP proxy binds (default 127.0.0.1: this machine only; 0.0.0.0 opens it "
                        "to the network)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"HTTP port (default {DEFAULT_PORT})")
    scale = p.add_mutually_exclusive_group()
    scale.add_argument("--replicas", type=int, default=d["replicas"].default,
                       help="model replicas (default 1)")
    scale.add_argument("--autoscale", metavar="MIN,MAX", default=None,
                       help="autoscale between MIN and MAX replicas on ongoing requests instead")
    p.add_argument("--cpus-per-replica", type=float, default=d["cpus_per_replica"].default,
                   help="CPUs Ray reserves per replica; torch uses as many threads (default 1)")
    p.add_argument("--gpus-per-replica", type=float, default=None,
                   help="GPUs per replica, fractions allowed (default 1 with --device cuda, else 0)")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    p.add_argument("--max-batch-size", type=int, default=d["max_batch_size"].default,
                   help="most requests in one forward (default 8; 1 turns batching off)")
    p.add_argument("--batch-wait-ms", type=float, default=d["batch_wait_ms"].default,
                   help="how long a request waits for others to share its forward (default 5)")
    p.add_argument("--max-ongoing-requests", type=int, default=None,
                   help="requests a replica takes at once; more wait in the proxy (default max(2 x batch, 16))")
    p.add_argument("--max-upload-mb", type=float, default=d["max_upload_mb"].default,
                   help="largest request body in MB (2^20 bytes) (default 20; more is refused with 413)")
    p.add_argument("--max-pixels", type=int, default=d["max_pixels"].default,
                   help="largest image in pixels, checked before decoding (default 40000000)")
    p.add_argument("--request-timeout-s", type=float, default=d["request_timeout_s"].default,
                   help="longest a request may take, end to end (default 60)")
    p.add_argument("--data-root", default=None, metavar="DIR",
                   help="an MP-100 layout (e.g. the synthetic set): the page offers its training categories' "
                        "names and a few held-out test images as examples")
    p.add_argument("--split", type=int, default=1, help="the split --data-root's categories come from (default 1)")
    p.add_argument("--address", default=None,
                   help="Ray cluster to join (default: RAY_ADDRESS, a local `ray start` cluster, else a new "
                        "local instance)")
    p.add_argument("--tracking-uri", default=None,
                   help="MLflow store for runs:/ and models:/ (default: MLFLOW_TRACKING_URI, else ./mlflow.db)")
    p.add_argument("--clip-checkpoint", default=None,
                   help="where the frozen CLIP's weights are on the serving machines (default: the training "
                        "config's)")
    return p.parse_args(argv)


def _port_free(host: str, port: int) -> bool:
    """Whether nothing listens on the port. SO_REUSEADDR, as Serve's proxy binds it: connections of a server
    stopped a moment ago, still in TIME_WAIT, do not block the port; a listening socket does."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
            return True
        except OSError:
            return False


def _wait_for_http(url: str, timeout: float) -> None:
    import urllib.request

    deadline = time.time() + timeout
    while True:
        try:
            with urllib.request.urlopen(f"{url}healthz", timeout=5) as r:
                if r.status == 200:
                    return
        except OSError:
            if time.time() > deadline:
                raise UsageError(f"the application is running but {url}healthz did not answer within "
                                 f"{timeout:.0f} s") from None
        time.sleep(0.5)


def _interrupt(signum, frame):
    """SIGTERM, and SIGINT however the process was started, stop the server as Ctrl-C does."""
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    import torch

    from jobs.common import init_ray, one_line
    from jobs.tracking import tracking_uri

    args = parse_args(argv)
    if not 0 < args.port < 65536:
        raise UsageError(f"--port {args.port}: must be 1..65535")
    if args.device.startswith("cuda") and args.address is None and not torch.cuda.is_available():
        raise UsageError(f"--device {args.device} but no CUDA device is visible")
    uri = tracking_uri(args.tracking_uri)
    options = check_options({
        "checkpoint": args.checkpoint, "tracking_uri": uri, "clip_checkpoint": args.clip_checkpoint,
        "device": args.device, "replicas": args.replicas, "autoscale": args.autoscale,
        "cpus_per_replica": args.cpus_per_replica, "gpus_per_replica": args.gpus_per_replica,
        "max_batch_size": args.max_batch_size, "batch_wait_ms": args.batch_wait_ms,
        "max_ongoing_requests": args.max_ongoing_requests, "max_upload_mb": args.max_upload_mb,
        "max_pixels": args.max_pixels, "request_timeout_s": args.request_timeout_s, "data_root": args.data_root,
        "split": args.split})
    check_checkpoint(options)
    application = build_application(options)

    init_ray(args.address)
    logging.getLogger("ray.serve").setLevel(logging.WARNING)
    import ray

    total = ray.cluster_resources()
    lo = autoscale_bounds(options.autoscale)[0] if options.autoscale else options.replicas
    need_cpu, need_gpu = max(lo, 1) * options.cpus_per_replica, max(lo, 1) * options.gpus
    if need_cpu > total.get("CPU", 0) or need_gpu > total.get("GPU", 0):
        raise UsageError(f"{max(lo, 1)} replica(s) need {need_cpu:g} CPUs and {need_gpu:g} GPUs, the Ray cluster has "
                         f"{total.get('CPU', 0):g} CPUs and {total.get('GPU', 0):g} GPUs: lower --replicas, "
                         "--cpus-per-replica or --gpus-per-replica")
    already = bool(serve.status().proxies)
    if not already and not _port_free(args.host, args.port):
        raise UsageError(f"port {args.port} on {args.host} is in use: pass another --port")
    serve.start(http_options={"host": args.host, "port": args.port,
                              "request_timeout_s": options.request_timeout_s})
    signal.signal(signal.SIGTERM, _interrupt)
    # a background job of a script starts with SIGINT ignored, and would not stop on it (a server should)
    signal.signal(signal.SIGINT, _interrupt)
    try:
        try:
            serve.run(application, name=APP_NAME, route_prefix="/", blocking=False)
        except KeyboardInterrupt:
            raise
        except Exception as err:  # a replica that cannot start: Serve gives up after its retries
            raise UsageError(f"the application did not start: {one_line(err)}") from None
        host = "127.0.0.1" if args.host in ("0.0.0.0", "::") else args.host
        url = f"http://{host}:{args.port}/"
        if not already:  # an existing Serve instance keeps its own host and port
            _wait_for_http(url, 60)
        note = " (Serve was already running here: its host and port stand)" if already else ""
        print(f"CapeNext is serving {display_name(options.checkpoint)} at {url} : POST {url}v1/predict, "
              f"GET {url}healthz, the page at {url}{note}; Ctrl-C stops it", flush=True)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("stopping ...", file=sys.stderr, flush=True)
    finally:
        # a second Ctrl-C (or a signal sent to the whole process group) must not cut the clean-up short
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        try:
            _bounded(lambda: serve.delete(APP_NAME) if already else serve.shutdown(), STOP_TIMEOUT_S)
        finally:
            ray.shutdown()
            signal.signal(signal.SIGINT, signal.default_int_handler)
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
    print("stopped", file=sys.stderr, flush=True)
    return 0


def _bounded(stop, seconds: float) -> None:
    """Run ``stop`` for at most ``seconds``, so that a Serve controller that never answers cannot keep
    Ctrl-C waiting; Ray's own shutdown, which follows, ends it."""
    import threading

    errors: list[BaseException] = []

    def run() -> None:
        try:
            stop()
        except BaseException as err:  # noqa: BLE001 -- re-raised in the caller's thread
            errors.append(err)

    worker = threading.Thread(target=run, name="serve-stop", daemon=True)
    worker.start()
    worker.join(seconds)
    if worker.is_alive():
        print(f"Serve did not stop within {seconds:.0f} s; stopping Ray", file=sys.stderr, flush=True)
    elif errors:
        raise errors[0]


if __name__ == "__main__":
    # the deployment must be pickled as jobs.serve's, not __main__'s, so that replicas import the module
    import jobs.serve

    run_main(jobs.serve.main)
