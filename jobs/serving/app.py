"""A replica of :mod:`jobs.serve`: request parsing and a replica's :class:`Service` (its FastAPI app is
:mod:`jobs.serving.web`, its limits and middleware :mod:`jobs.serving.limits`, the page :mod:`jobs.serving.page`). Nothing here names Ray: the
deployment in :mod:`jobs.serving.deployment` subclasses :class:`Service` and serves :func:`jobs.serving.web.build_web_app`'s app.

The form's text fields are read by :mod:`capenext.inputs`, the rules ``python -m jobs.predict`` reads its flags
by (each field may also be a JSON list here); the library's one-line ``ValueError`` becomes a 400.

What a request goes through, in order (every refusal is a status and ``{"error": "<one line>"}``):

1. :class:`Guard` (outermost): the ``Host`` header must name this server (``127.0.0.1``, ``localhost``,
   ``[::1]``, ``--host``, ``--allow-host``: a page of another site reaching 127.0.0.1 through DNS rebinding
   carries its own name) and a ``POST`` from a browser must come from the server's own origin or an
   ``--allow-origin`` (multipart needs no preflight, so any page could post otherwise): 403. Then the
   admission gate of ``POST /v1/predict``: :attr:`ServeOptions.ongoing` requests at work, :attr:`ServeOptions.queued`
   waiting (before their bodies are read), past those a 503 with ``Retry-After`` at once. An exception
   nobody answered is a 500 in JSON.
2. :class:`BodyLimit`: a body over ``--max-upload-mb`` is a 413.
3. The route: text fields bounded and parsed (:func:`parse_form`), the class checked, the image's header
   read in the formats of :data:`capenext.predict.IMAGE_FORMATS` only and its pixels checked; then the image
   is decoded on the replica's decode threads (as many as its CPUs) within the replica's pixel budget
   (:class:`PixelBudget`), the query checked completely off the event loop (:meth:`Predictor.check_query`:
   names, skeleton, box, class, CLIP token counts), and only then does it join a batch. A batch that fails
   anyway is predicted again one query at a time (:meth:`Predictor.predict_each`), so that each query gets
   its own answer.
"""

from __future__ import annotations

import asyncio
import io
import logging
import tempfile
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any, AsyncIterator, Iterator

import numpy as np

from jobs.serving.limits import MB, RETRY_AFTER_S, ApiError, Gate, PixelBudget
from jobs.serving.options import ServeOptions

log = logging.getLogger("capenext.serve")


# --- request parsing (every problem is an ApiError: a status and one line) ---------------------------


def _formats() -> str:
    from capenext.predict import IMAGE_FORMATS

    return ", ".join(IMAGE_FORMATS)


def image_size(data: bytes, max_pixels: int) -> tuple[int, int]:
    """The uploaded image's (width, height), from its header alone (PIL opens only
    :data:`capenext.predict.IMAGE_FORMATS`); a 400 for no image, another format, a broken header or more
    than ``max_pixels`` pixels, before anything is decompressed."""
    from PIL import Image, UnidentifiedImageError

    from capenext.predict import IMAGE_FORMATS

    if not data:
        raise ApiError(400, "the 'image' file is empty")
    try:
        with Image.open(io.BytesIO(data), formats=IMAGE_FORMATS) as im:  # reads the header only
            w, h = im.size
    except UnidentifiedImageError:
        raise ApiError(400, f"the 'image' file is not an image in a format we read ({_formats()})") from None
    except Image.DecompressionBombError as err:
        raise ApiError(400, f"image refused as a decompression bomb: {err}") from None
    except (OSError, ValueError, SyntaxError, EOFError) as err:  # a broken header
        raise ApiError(400, f"cannot decode the 'image' file: {' '.join(str(err).split())[:200]}") from None
    if w * h > max_pixels:
        raise ApiError(400, f"image is {w}x{h} = {w * h} pixels, over the limit of {max_pixels} "
                            "(the server's --max-pixels)")
    return w, h


def load_checked(data: bytes) -> np.ndarray:
    """Bytes whose header :func:`image_size` accepted → (H, W, 3) uint8 RGB, decoded by
    :func:`capenext.predict.load_image` (as ``jobs.predict`` decodes the same file); a 400 for bad data."""
    from PIL import Image

    from capenext.predict import load_image

    try:
        return load_image(data)
    except ValueError as err:  # truncated or corrupt data
        raise ApiError(400, f"cannot decode the 'image' file: {str(err).removeprefix('cannot read image image: ')}") \
            from None
    except Image.DecompressionBombError as err:
        raise ApiError(400, f"image refused as a decompression bomb: {err}") from None


def restrict_image_formats() -> None:
    """This process's PIL opens :data:`capenext.predict.IMAGE_FORMATS` only, whoever calls it (the page's
    image component opens uploads with PIL itself): every other format's opener is dropped."""
    from PIL import Image

    from capenext.predict import IMAGE_FORMATS

    Image.init()
    Image.ID[:] = [f for f in Image.ID if f in IMAGE_FORMATS]


@contextmanager
def bad_request() -> Iterator[None]:
    """The library's one-line ``ValueError`` (a bad name, skeleton, box ...) as a 400."""
    try:
        yield
    except ValueError as err:
        raise ApiError(400, str(err)) from None


def parse_form(names: str | None, skeleton: str | None,
               bbox: str | None) -> tuple[list[str], list, tuple[float, float, float, float] | None]:
    """The form's ``keypoints`` (``nose,left eye`` or a JSON list of strings), ``skeleton`` (``0-1,1-2`` or a
    JSON list of index pairs) and ``bbox`` (``x,y,w,h``); an empty field is an absent one (no skeleton, the
    whole image). Each field is bounded in characters first (:mod:`capenext.inputs`); each problem is a 400
    naming the field."""
    from capenext.inputs import parse_bbox, parse_names, parse_skeleton

    with bad_request():
        return (parse_names(names, "'keypoints'", json_list=True),
                parse_skeleton(skeleton, "'skeleton'", json_list=True),
                parse_bbox(bbox if bbox and bbox.strip() else None, "'bbox'"))


def flag(value: str | None) -> bool:
    return (value or "").strip().lower() in ("1", "true", "yes", "on")


# --- the replica ------------------------------------------------------------------------------------


def display_name(spec: str) -> str:
    """What the API and the page say is loaded: a file's name (no server paths), else the spec as given."""
    return Path(spec).name if Path(spec).is_file() else spec


class Service:
    """What a replica serves: the predictor, its limits and the query path shared by the API and the page.

    ``forward`` is the batched model call (the deployment's ``@serve.batch`` method); everything else is
    plain code, so the web app can be built around any object with these attributes.
    """

    def __init__(self, options: ServeOptions, page: dict[str, Any] | None = None):
        import torch
        from PIL import Image

        from capenext.predict import Predictor
        from jobs.runtime.checkpoints import resolve_checkpoint
        from jobs.runtime.tracking import tracking_uri

        self.options = options
        cpus = max(1, int(options.cpus_per_replica))
        if options.device == "cpu":
            torch.set_num_threads(cpus)
        restrict_image_formats()
        # PIL refuses, in whoever's open (the page's component too), more than twice --max-pixels (the API
        # refuses more than --max-pixels itself, from the header, with its own message)
        Image.MAX_IMAGE_PIXELS = options.max_pixels
        self._tmp = tempfile.TemporaryDirectory(prefix="capenext-serve-")
        source = resolve_checkpoint(options.checkpoint, tracking_uri(options.tracking_uri),
                                    Path(self._tmp.name) / "checkpoint")
        self.predictor = Predictor(source.path, clip_checkpoint=options.clip_checkpoint, device=options.device,
                                   runtime=options.runtime, onnx_dir=options.onnx)
        self.predictor.model.clip.identity  # noqa: B018 -- the CLIP file's digest (text-cache keys), read once now
        cfg = self.predictor.cfg
        self.info = {
            "checkpoint": display_name(options.checkpoint),
            "run_id": source.run_id or self.predictor.meta.get("run_id"),
            "ablation": cfg.model.ablation, "backbone": cfg.model.backbone, "clip_model": cfg.model.clip_model,
            "image_embedding": cfg.model.image_embedding, "image_size": cfg.data.image_size,
            "max_keypoints": self.predictor.slots, "needs_class": bool(self.predictor.model.needs_class_embedding),
            "device": options.device, "runtime": options.runtime,
        }
        self.page = page or {}
        self.max_upload = int(options.max_upload_mb * MB)
        self.stats = {"queries": 0, "batches": 0, "largest_batch": 0}  # this replica's forwards so far
        # one model thread: forwards run one after another, off the event loop that takes in requests
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="capenext-model")
        # decoding, checking and drawing: as many threads as the replica has CPUs, within a pixel budget
        self._cpu = ThreadPoolExecutor(max_workers=cpus, thread_name_prefix="capenext-decode")
        self.pixels = PixelBudget(options.decoded_pixels)
        self.gate = Gate(options.ongoing, options.queued)

    def health(self) -> dict[str, Any]:
        """``/healthz``: the status and this replica's counts, nothing that names the model or its run."""
        return {"status": "ok", "replica": {**self.stats, "working": self.gate.active, "waiting": self.gate.waiting,
                                            "refused_busy": self.gate.refused}}

    async def cpu(self, fn, *args):
        """``fn(*args)`` on the replica's decode threads."""
        return await asyncio.get_running_loop().run_in_executor(self._cpu, fn, *args)

    def check_fields(self, names: list[str], skeleton: list, class_name: str | None) -> str | None:
        """The checks of the text fields against the model that cost nothing (the count of names against
        its slots, the skeleton's indices, the class), before the image is decoded; the class, stripped."""
        from capenext.inputs import check_class_name, check_names, check_skeleton

        with bad_request():
            check_skeleton(skeleton, len(check_names(names, self.predictor.slots)))
            return check_class_name(class_name, self.info["needs_class"], self.info["ablation"],
                                    "send 'class' (e.g. cat)", field="'class'")

    @asynccontextmanager
    async def decoded(self, data: bytes) -> AsyncIterator[np.ndarray]:
        """The image of ``data``: its header checked here, then decoded on the decode threads once its pixels
        fit the replica's budget, which it holds until the request is answered."""
        w, h = image_size(data, self.options.max_pixels)
        async with self.pixels.hold(w * h, self.options.request_timeout_s):
            yield await self.cpu(load_checked, data)

    async def check(self, rgb: np.ndarray, names: list[str], class_name: str | None, skeleton: list,
                    bbox: tuple[float, float, float, float] | None):
        """Every check short of the model, before the query joins a batch (a bad query never fails a batch):
        :meth:`capenext.predict.Predictor.check_query`, off the event loop (it tokenizes)."""
        from capenext.predict import Query

        class_name = self.check_fields(names, skeleton, class_name)

        def run():
            with bad_request():
                return self.predictor.check_query(Query(rgb, names, class_name, skeleton, bbox),
                                                  "'keypoints' name", "'class' (as 'a photo of ...')")

        return await self.cpu(run)

    async def run_model(self, queries: list) -> list:
        """The batched forward: each query's points, or the exception it raised predicted alone."""
        self.stats["queries"] += len(queries)
        self.stats["batches"] += 1
        self.stats["largest_batch"] = max(self.stats["largest_batch"], len(queries))
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, self.predictor.predict_each, queries)

    async def answer(self, query) -> list[dict[str, Any]]:
        """The query's points through the batched forward, within the request timeout (503 past it); a query
        that failed in the model is its own 400 (a bad input) or 500."""
        timeout = self.options.request_timeout_s
        try:
            result = await asyncio.wait_for(self.forward(query), timeout=timeout)
        except asyncio.TimeoutError:
            raise ApiError(503, f"the model did not answer within {timeout:g} s (the server's "
                                "--request-timeout-s); try again", {"Retry-After": str(RETRY_AFTER_S)}) from None
        if isinstance(result, (ValueError, FileNotFoundError)):
            raise ApiError(400, str(result))
        if isinstance(result, BaseException):
            log.error("the model failed on one query", exc_info=(type(result), result, result.__traceback__))
            raise ApiError(500, f"the model failed on this request ({type(result).__name__}); the server's log "
                                "has the details")
        return result

    def record(self, query, points: list[dict[str, Any]]) -> dict[str, Any]:
        h, w = query.image.shape[:2]
        return {
            "keypoints": [{"name": p["name"], "x": round(p["x"], 2), "y": round(p["y"], 2),
                           "score": round(p["score"], 4), "inside_image": p["inside_image"]} for p in points],
            "image": {"width": int(w), "height": int(h)},
            "bbox": list(query.bbox) if query.bbox is not None else [0, 0, int(w), int(h)],
            "class": query.class_name, "skeleton": [list(e) for e in query.skeleton], "model": self.info,
        }

    def picture(self, query, points: list[dict[str, Any]]):
        from capenext.viz import draw_keypoints

        return draw_keypoints(query.image, [[p["x"], p["y"]] for p in points], query.names, query.skeleton,
                              [p["score"] for p in points], bbox=query.bbox,
                              inside=[p["inside_image"] for p in points])
