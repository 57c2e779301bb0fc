"""CapeNext on Ray Serve: ``python -m jobs.serve --checkpoint X``, an HTTP API and a web page.

One deployment, ``CapeNext``: each replica holds one :class:`capenext.predict.Predictor` and serves a
FastAPI app (the ingress) with

* ``GET /healthz``: 200 ``{"status": "ok", "replica": {"queries", "batches", "largest_batch", "working",
  "waiting", "refused_busy"}}`` once the replica has loaded the model (the counts are the answering
  replica's; nothing names the model or its run);
* ``GET /v1/model``: what is loaded (checkpoint, ablation, backbone, CLIP model, crop size, keypoint slots);
* ``POST /v1/predict``: a multipart form, ``image`` (file), ``keypoints`` (``nose,left eye`` or a JSON list),
  ``class``, optional ``skeleton`` (``0-1,1-2``) and ``bbox`` (``x,y,w,h`` in image pixels, default the whole
  image) → ``{"keypoints": [{"name", "x", "y", "score", "inside_image"}], "image": {"width", "height"}, "bbox", "class",
  "skeleton", "model": {...}}``, the numbers ``python -m jobs.predict`` prints for the same inputs;
  ``?picture=1`` answers the drawn PNG (:func:`capenext.viz.draw_keypoints`) instead;
* ``/``: a Gradio page on the same app (upload, names or a training category's names, class, skeleton,
  box; Run shows the picture and the JSON; examples from ``--data-root``'s held-out test categories).

Concurrent requests meet in ``@serve.batch``: up to ``--max-batch-size`` queries, waiting at most
``--batch-wait-ms`` for company, go through :meth:`Predictor.predict_many` as one forward (each query padded
to the model's keypoint slots, as the data layer pads). Batching settings are the deployment's
``user_config``, so ``serve deploy`` changes them without restarting replicas.

Safe by default (``docs/serving.md``, "Security", says what is checked and what the operator must add): the
proxy binds 127.0.0.1 unless ``--host`` says otherwise, and a request whose ``Host`` is not a name of the
server, or a POST from another site's page, is refused (403; ``--allow-host``, ``--allow-origin``); nothing in
a request is run or unpickled (images are decoded in six formats after a pixel-count check, the rest is text,
each field bounded in characters); an upload over ``--max-upload-mb`` is refused with 413 while it streams
in, an image over ``--max-pixels`` (a decompression bomb) with 400 before it is decoded, and a replica holds
at most ``--max-decoded-pixels`` decoded; a replica works on ``--max-ongoing-requests`` requests, keeps
``--max-queued-requests`` waiting and answers the next at once with 503 and ``Retry-After``; a request waits
at most ``--request-timeout-s`` (the proxy's timeout, and the model's answer inside the replica, 503 past
it). Every bad request is a 4xx with ``{"error": "<one line>"}`` and the replica carries on; a query that
fails in a batched forward fails alone. ``/docs`` is off unless ``--api-docs``.

The same application runs under Serve's own tools: ``serve run jobs.serve:app checkpoint=X`` (``app`` is an
application builder taking :class:`~jobs.serving.options.ServeOptions`' fields as ``key=value``), ``serve deploy cluster/serve.yaml``, and
KubeRay's ``cluster/rayservice.yaml``. ``--checkpoint`` is anything
:func:`jobs.runtime.checkpoints.resolve_checkpoint` takes (a file, ``runs:/...``, a run id,
``models:/NAME@ALIAS``, ``models:/NAME/VERSION``); each replica resolves it itself, so on a cluster the file or
the MLflow store must be reachable from every node.

``--runtime onnx --onnx DIR`` makes every replica's :class:`~capenext.predict.Predictor` compute with onnxruntime
on CPU over the folder ``python -m jobs.export`` wrote from the same checkpoint (the default, ``torch``, needs
no export). The folder is checked against the checkpoint (``model.json``'s sha256) where the application is
built, before Ray or Serve starts: a folder of another checkpoint is one ``error:`` line.

This module is the command line and the application builder ``app``; the options are
:mod:`jobs.serving.options` (:class:`~jobs.serving.options.ServeOptions`), the deployment and the
application :mod:`jobs.serving.deployment`, a replica's request parsing and :class:`Service`
:mod:`jobs.serving.app`, its FastAPI routes :mod:`jobs.serving.web`, its limits and middleware
:mod:`jobs.serving.limits`, the page :mod:`jobs.serving.page`; the form's fields are read by :mod:`capenext.inputs`, as ``jobs.predict``
reads its flags.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import time
from typing import Any

from capenext.cli import UsageError, run_main
from capenext.options import (
    add_address,
    add_config_option,
    add_device,
    add_runtime,
    add_tracking_uri,
    check_runtime,
)
from jobs.runtime.checkpoints import CHECKPOINT_HELP
from jobs.serving.app import display_name
from jobs.serving.deployment import build_application, check_checkpoint, port_free
from jobs.serving.options import APP_NAME, DEFAULT_PORT, ServeOptions, check_options

STOP_TIMEOUT_S = 60.0  # the most Ctrl-C waits for Serve to stop its replicas (each gets 20 s) before Ray stops


def app(args: dict[str, Any]):
    """The application builder of ``serve run jobs.serve:app checkpoint=X [key=value ...]`` and of a Serve
    config's ``import_path``: ``args`` are :class:`~jobs.serving.options.ServeOptions` fields. A missing
    checkpoint fails here, before anything is deployed (Serve's CLI prints it with its traceback)."""
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
               "  python -m jobs.serve --checkpoint final.pt --runtime onnx --onnx final_onnx/   "
               "(after python -m jobs.export --checkpoint final.pt --out final_onnx/)\n"
               "  curl -F image=@cat.jpg -F keypoints='nose,left eye,right eye' -F class=cat "
               "http://127.0.0.1:8000/v1/predict\n"
               "the same app under Serve's CLI: serve run jobs.serve:app checkpoint=final.pt max_batch_size=16",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--checkpoint", required=True, help=CHECKPOINT_HELP)
    p.add_argument("--host", default="127.0.0.1",
                   help="address the HTTP proxy binds (default 127.0.0.1: this machine only; 0.0.0.0 opens it "
                        "to the network, which needs authentication in front: the API has none)")
    p.add_argument("--allow-host", action="append", default=[], metavar="NAME",
                   help="a further name clients reach the server by, accepted in the Host header (repeatable; "
                        "127.0.0.1, localhost, [::1] and --host always are; '*' any, only behind a proxy that "
                        "checks Host). Other names are refused with 403 (DNS rebinding)")
    p.add_argument("--allow-origin", action="append", default=[], metavar="ORIGIN",
                   help="a web origin (scheme://host[:port]) whose pages may POST to the API (repeatable); "
                        "other sites' POSTs are refused with 403")
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
    add_device(p, "the model (every replica)")
    add_runtime(p, "every replica's predictions")
    p.add_argument("--max-batch-size", type=int, default=d["max_batch_size"].default,
                   help="most requests in one forward (default 8; 1 turns batching off)")
    p.add_argument("--batch-wait-ms", type=float, default=d["batch_wait_ms"].default,
                   help="how long a request waits for others to share its forward (default 5)")
    p.add_argument("--max-ongoing-requests", type=int, default=None,
                   help="requests a replica works on at once (default max(2 x batch, 16))")
    p.add_argument("--max-queued-requests", type=int, default=None,
                   help="requests that wait for those, per replica; past them a 503 with Retry-After at once "
                        "(default 4 x --max-ongoing-requests)")
    p.add_argument("--max-upload-mb", type=float, default=d["max_upload_mb"].default,
                   help="largest request body in MB (2^20 bytes) (default 20; more is refused with 413)")
    p.add_argument("--max-pixels", type=int, default=d["max_pixels"].default,
                   help="largest image in pixels, checked before decoding (default 40000000)")
    p.add_argument("--max-decoded-pixels", type=int, default=None,
                   help="pixels a replica decodes and holds at once, over all its requests; more wait "
                        "(default --max-pixels)")
    p.add_argument("--request-timeout-s", type=float, default=d["request_timeout_s"].default,
                   help="longest a request may take, end to end (default 60)")
    p.add_argument("--data-root", default=None, metavar="DIR",
                   help="an MP-100 layout (e.g. the synthetic set): the page offers its training categories' "
                        "names and a few held-out test images as examples")
    p.add_argument("--split", type=int, default=1, help="the split --data-root's categories come from (default 1)")
    p.add_argument("--api-docs", action="store_true",
                   help="serve the API's pages /docs (Swagger UI) and /redoc (off by default: their scripts "
                        "and styles load from a CDN, jsdelivr.net, in the reader's browser)")
    add_address(p)
    add_tracking_uri(p)
    add_config_option(p, "clip_checkpoint",
                      help="where the frozen CLIP's weights are on the serving machines (default: the training "
                           "config's)")
    return p.parse_args(argv)


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
    from ray import serve

    from capenext.cli import one_line
    from jobs.runtime.cluster import init_ray
    from jobs.runtime.tracking import tracking_uri

    args = parse_args(argv)
    check_runtime(args)
    if not 0 < args.port < 65536:
        raise UsageError(f"--port {args.port}: must be 1..65535")
    if args.device == "cuda" and args.address is None and not torch.cuda.is_available():
        raise UsageError(f"--device {args.device} but no CUDA device is visible")
    uri = tracking_uri(args.tracking_uri)
    options = check_options({
        "checkpoint": args.checkpoint, "tracking_uri": uri, "clip_checkpoint": args.clip_checkpoint,
        "device": args.device, "runtime": args.runtime, "onnx": args.onnx,
        "replicas": args.replicas, "autoscale": args.autoscale,
        "cpus_per_replica": args.cpus_per_replica, "gpus_per_replica": args.gpus_per_replica,
        "max_batch_size": args.max_batch_size, "batch_wait_ms": args.batch_wait_ms,
        "max_ongoing_requests": args.max_ongoing_requests, "max_queued_requests": args.max_queued_requests,
        "max_upload_mb": args.max_upload_mb, "max_pixels": args.max_pixels,
        "max_decoded_pixels": args.max_decoded_pixels, "request_timeout_s": args.request_timeout_s,
        "host": args.host, "allow_hosts": args.allow_host, "allow_origins": args.allow_origin,
        "api_docs": args.api_docs, "data_root": args.data_root, "split": args.split})
    check_checkpoint(options)
    application = build_application(options)

    init_ray(args.address)
    logging.getLogger("ray.serve").setLevel(logging.WARNING)
    import ray

    total = ray.cluster_resources()
    lo = options.min_replicas
    need_cpu, need_gpu = lo * options.cpus_per_replica, lo * options.gpus
    if need_cpu > total.get("CPU", 0) or need_gpu > total.get("GPU", 0):
        raise UsageError(f"{lo} replica(s) need {need_cpu:g} CPUs and {need_gpu:g} GPUs, the Ray cluster has "
                         f"{total.get('CPU', 0):g} CPUs and {total.get('GPU', 0):g} GPUs: lower --replicas, "
                         "--cpus-per-replica or --gpus-per-replica")
    already = bool(serve.status().proxies)
    if not already and not port_free(args.host, args.port):
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
    run_main(main)
