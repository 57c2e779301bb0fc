"""The HTTP layer of :mod:`jobs.serve`: request parsing and limits, a replica's :class:`Service`, its FastAPI
app (``/healthz``, ``/v1/model``, ``/v1/predict``) and the Gradio page at ``/``. Nothing here names Ray: the
deployment in :mod:`jobs.serving.deployment` subclasses :class:`Service` and serves :func:`build_web_app`'s app.

The form's text fields are read by :mod:`capenext.inputs`, the rules ``python -m jobs.predict`` reads its flags
by (each field may also be a JSON list here); the library's one-line ``ValueError`` becomes a 400.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import tempfile
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import numpy as np
from fastapi import Request  # at module level: FastAPI resolves the routes' string annotations here

from capenext.cli import UsageError
from jobs.serving.options import ServeOptions

MB = 1 << 20
EXAMPLES = 3  # example images on the page: the first image of this many held-out test categories

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # the page never phones home


# --- request parsing (every problem is an ApiError: a status and one line) ---------------------------


class ApiError(Exception):
    """A bad request: answered with ``status`` and ``{"error": message}``."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, " ".join(message.split())


class BodyTooLarge(ApiError):
    def __init__(self, limit: int):
        super().__init__(413, f"upload over the limit of {limit / MB:g} MB (the server's --max-upload-mb)")


def decode_image(data: bytes, max_pixels: int) -> np.ndarray:
    """Uploaded bytes → (H, W, 3) uint8 RGB, decoded by :func:`capenext.predict.load_image` (as
    ``jobs.predict`` decodes the same file); the pixel count is read from the header and checked before
    anything is decompressed."""
    from PIL import Image, UnidentifiedImageError

    from capenext.predict import load_image

    if not data:
        raise ApiError(400, "the 'image' file is empty")
    try:
        with Image.open(io.BytesIO(data)) as im:  # reads the header only
            w, h = im.size
    except UnidentifiedImageError:
        raise ApiError(400, "the 'image' file is not an image (no format PIL can decode)") from None
    except Image.DecompressionBombError as err:
        raise ApiError(400, f"image refused as a decompression bomb: {err}") from None
    except (OSError, ValueError, SyntaxError, EOFError) as err:  # a broken header
        raise ApiError(400, f"cannot decode the 'image' file: {' '.join(str(err).split())[:200]}") from None
    if w * h > max_pixels:
        raise ApiError(400, f"image is {w}x{h} = {w * h} pixels, over the limit of {max_pixels} "
                            "(the server's --max-pixels)")
    try:
        return load_image(data)
    except ValueError as err:  # truncated or corrupt data
        raise ApiError(400, f"cannot decode the 'image' file: {str(err).removeprefix('cannot read image image: ')}") \
            from None
    except Image.DecompressionBombError as err:
        raise ApiError(400, f"image refused as a decompression bomb: {err}") from None


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
    whole image). Each problem is a 400 naming the field."""
    from capenext.inputs import parse_bbox, parse_names, parse_skeleton

    with bad_request():
        return (parse_names(names, "'keypoints'", json_list=True),
                parse_skeleton(skeleton, "'skeleton'", json_list=True),
                parse_bbox(bbox if bbox and bbox.strip() else None))


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

        from capenext.predict import Predictor
        from pipelines.runtime.checkpoints import resolve_checkpoint
        from pipelines.runtime.tracking import tracking_uri

        self.options = options
        if options.device == "cpu":
            torch.set_num_threads(max(1, int(options.cpus_per_replica)))
        self._tmp = tempfile.TemporaryDirectory(prefix="capenext-serve-")
        source = resolve_checkpoint(options.checkpoint, tracking_uri(options.tracking_uri),
                                    Path(self._tmp.name) / "checkpoint")
        self.predictor = Predictor(source.path, clip_checkpoint=options.clip_checkpoint, device=options.device)
        cfg = self.predictor.cfg
        self.info = {
            "checkpoint": display_name(options.checkpoint),
            "run_id": source.run_id or self.predictor.meta.get("run_id"),
            "ablation": cfg.model.ablation, "backbone": cfg.model.backbone, "clip_model": cfg.model.clip_model,
            "image_embedding": cfg.model.image_embedding, "image_size": cfg.data.image_size,
            "max_keypoints": self.predictor.slots, "needs_class": bool(self.predictor.model.needs_class_embedding),
            "device": options.device,
        }
        self.page = page or {}
        self.max_upload = int(options.max_upload_mb * MB)
        self.stats = {"queries": 0, "batches": 0, "largest_batch": 0}  # this replica's forwards so far
        # one model thread: forwards run one after another, off the event loop that takes in requests
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="capenext-model")

    def check(self, rgb: np.ndarray, names: list[str], class_name: str | None, skeleton: list,
              bbox: tuple[float, float, float, float] | None):
        """Every model-dependent check before a query joins a batch (a bad query never fails a batch)."""
        from capenext.inputs import check_bbox, check_class_name, check_names, check_skeleton
        from capenext.predict import Query

        with bad_request():
            check_names(names, self.predictor.slots)
            edges = check_skeleton(skeleton, len(names))
            check_bbox(bbox, rgb.shape[1], rgb.shape[0])
            class_name = check_class_name(class_name, self.info["needs_class"], self.info["ablation"],
                                          "send 'class' (e.g. cat)")
        return Query(rgb, names, class_name, edges, bbox)

    async def run_model(self, queries: list) -> list[list[dict[str, Any]]]:
        self.stats["queries"] += len(queries)
        self.stats["batches"] += 1
        self.stats["largest_batch"] = max(self.stats["largest_batch"], len(queries))
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, self.predictor.predict_many, queries)

    async def answer(self, query) -> list[dict[str, Any]]:
        """The query's points through the batched forward, within the request timeout (503 past it)."""
        timeout = self.options.request_timeout_s
        try:
            return await asyncio.wait_for(self.forward(query), timeout=timeout)
        except asyncio.TimeoutError:
            raise ApiError(503, f"the model did not answer within {timeout:g} s (the server's "
                                "--request-timeout-s); try again") from None

    def record(self, query, points: list[dict[str, Any]]) -> dict[str, Any]:
        h, w = query.image.shape[:2]
        return {
            "keypoints": [{"name": p["name"], "x": round(p["x"], 2), "y": round(p["y"], 2),
                           "score": round(p["score"], 4)} for p in points],
            "image": {"width": int(w), "height": int(h)},
            "bbox": list(query.bbox) if query.bbox is not None else [0, 0, int(w), int(h)],
            "class": query.class_name, "skeleton": [list(e) for e in query.skeleton], "model": self.info,
        }

    def picture(self, query, points: list[dict[str, Any]]):
        from capenext.viz import draw_keypoints

        return draw_keypoints(query.image, [[p["x"], p["y"]] for p in points], query.names, query.skeleton,
                              [p["score"] for p in points], bbox=query.bbox)


class _BodyLimit:
    """ASGI middleware: a request body over ``limit`` bytes is refused with 413, before it is read when
    ``Content-Length`` says so, else as soon as the streamed bytes pass the limit."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.limit:
            return await _send_json(send, 413, {"error": BodyTooLarge(self.limit).message})
        seen = 0

        async def limited():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise BodyTooLarge(self.limit)
            return message

        return await self.app(scope, limited, send)


async def _send_json(send, status: int, body: dict) -> None:
    data = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": data})


def build_web_app(service: Service):
    """The replica's FastAPI app: the JSON API, then the Gradio page mounted at ``/``."""
    from fastapi import FastAPI
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, Response
    from starlette.exceptions import HTTPException

    api = FastAPI(title="CapeNext", version="1", docs_url="/docs", redoc_url=None,
                  description="Text-guided category-agnostic pose estimation: keypoints from their names.")

    @api.exception_handler(ApiError)
    async def _api_error(request: Request, err: ApiError):
        return JSONResponse({"error": err.message}, status_code=err.status)

    @api.exception_handler(HTTPException)
    async def _http_error(request: Request, err: HTTPException):
        return JSONResponse({"error": " ".join(str(err.detail).split())}, status_code=err.status_code,
                            headers=getattr(err, "headers", None))

    @api.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, err: RequestValidationError):
        first = err.errors()[0] if err.errors() else {}
        where = ".".join(str(x) for x in first.get("loc", ()))
        return JSONResponse({"error": f"{where}: {first.get('msg', 'invalid request')}"}, status_code=400)

    @api.get("/healthz")
    async def healthz():
        return {"status": "ok", "model": service.info, "replica": service.stats}

    @api.get("/v1/model")
    async def model():
        return service.info

    @api.post("/v1/predict")
    async def predict(request: Request):
        ctype = request.headers.get("content-type", "")
        if not ctype.startswith("multipart/form-data"):
            raise ApiError(415, "POST /v1/predict takes multipart/form-data: image (file), keypoints, class, "
                                f"optional skeleton and bbox (got content-type {ctype or 'none'!r})")
        try:
            form = await request.form(max_files=1, max_fields=16)
        except ApiError:
            raise
        except Exception as err:  # MultiPartException and friends: a broken form
            raise ApiError(400, f"cannot read the multipart form: {' '.join(str(err).split())[:200]}") from None
        upload = form.get("image")
        if upload is None or isinstance(upload, str):
            raise ApiError(400, "no 'image' file in the form (send the picture as a file field named image)")
        names, skeleton, bbox = parse_form(_text(form, "keypoints"), _text(form, "skeleton"), _text(form, "bbox"))
        data = await upload.read()
        rgb = await asyncio.to_thread(decode_image, data, service.options.max_pixels)
        query = service.check(rgb, names, _text(form, "class"), skeleton, bbox)
        points = await service.answer(query)
        if flag(request.query_params.get("picture")):
            png = await asyncio.to_thread(_png, service.picture(query, points))
            return Response(png, media_type="image/png")
        return service.record(query, points)

    routes = {"/healthz": "GET", "/v1/model": "GET", "/v1/predict": "POST"}

    @api.api_route("/v1/{rest:path}", methods=["GET", "POST", "PUT", "PATCH", "DELETE"], include_in_schema=False)
    async def unknown(rest: str, request: Request):  # before the page's mount, which would answer 404 in HTML
        path = f"/v1/{rest}"
        if path in routes:
            raise ApiError(405, f"{path} takes {routes[path]}, not {request.method}")
        raise ApiError(404, f"no API path {path}: the API has " + ", ".join(f"{m} {p}" for p, m in routes.items()))

    api.add_middleware(_BodyLimit, limit=service.max_upload)
    _mount_page(api, service)
    return api


def _text(form, key: str) -> str | None:
    value = form.get(key)
    if value is None:
        return None
    if not isinstance(value, str):
        raise ApiError(400, f"'{key}' must be a text field, not a file")
    return value


def _png(image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


# --- the page ---------------------------------------------------------------------------------------


def _mount_page(api, service: Service) -> None:
    """The Gradio page at ``/`` of ``api``: same queries, same batching, same limits as the API."""
    # uploads and the page's files stay in the replica's own temporary folder
    os.environ.setdefault("GRADIO_TEMP_DIR", str(Path(service._tmp.name) / "gradio"))
    import gradio as gr

    info, page = service.info, service.page
    categories = {c["name"]: c for c in page.get("categories", [])}
    example_dir = Path(service._tmp.name) / "examples"
    example_dir.mkdir(exist_ok=True)
    examples = []
    for i, ex in enumerate(page.get("examples", [])):
        path = example_dir / f"{i}-{Path(ex['file']).name}"
        path.write_bytes(ex["data"])
        examples.append([str(path), ", ".join(ex["keypoints"]), ex["class"],
                         ",".join(f"{a}-{b}" for a, b in ex["skeleton"]),
                         ",".join(f"{v:g}" for v in ex["bbox"])])

    async def run(image_path, names_text, class_name, skeleton_text, bbox_text):
        if not image_path:
            raise gr.Error("Upload an image first.")
        try:
            data = Path(image_path).read_bytes()
            if len(data) > service.max_upload:
                raise BodyTooLarge(service.max_upload)
            names, skeleton, bbox = parse_form(names_text, skeleton_text, bbox_text)
            rgb = await asyncio.to_thread(decode_image, data, service.options.max_pixels)
            query = service.check(rgb, names, class_name, skeleton, bbox)
            points = await service.answer(query)
        except ApiError as err:
            raise gr.Error(err.message) from None
        return service.picture(query, points), service.record(query, points)

    def fill(name):
        c = categories.get(name)
        if c is None:
            return gr.update(), gr.update(), gr.update()
        return ", ".join(c["keypoints"]), c["name"].replace("_", " "), ",".join(f"{a}-{b}" for a, b in c["skeleton"])

    described = (f"**Model:** `{info['checkpoint']}` · {info['ablation']} ablation · {info['backbone']} backbone · "
                 f"CLIP {info['clip_model']} · crop {info['image_size']} px · up to {info['max_keypoints']} "
                 "keypoints")
    with gr.Blocks(title="CapeNext", delete_cache=(3600, 3600)) as blocks:  # uploads older than an hour go
        gr.Markdown("## CapeNext: keypoints from their names\nUpload an image, name the keypoints you want "
                    "(any words), say what the object is, and run. The model never needs an example of "
                    "the category.")
        gr.Markdown(described, elem_id="model-info")
        with gr.Row():
            with gr.Column():
                image = gr.Image(type="filepath", sources=["upload"], label="Image", elem_id="image")
                if categories:
                    category = gr.Dropdown(sorted(categories), value=None, label="Start from a training category",
                                           elem_id="category")
                names = gr.Textbox(label="Keypoint names (comma-separated)", placeholder="nose, left eye, right eye",
                                   elem_id="names")
                class_name = gr.Textbox(label="Class", placeholder="cat", elem_id="class")
                with gr.Row():
                    skeleton = gr.Textbox(label="Skeleton (optional)", placeholder="0-1,0-2", elem_id="skeleton")
                    bbox = gr.Textbox(label="Box x,y,w,h in pixels (optional, default the whole image)",
                                      placeholder="10,20,200,150", elem_id="bbox")
                button = gr.Button("Run", variant="primary", elem_id="run")
            with gr.Column():
                picture = gr.Image(type="pil", format="png", label="Prediction", interactive=False,
                                   elem_id="picture")
                result = gr.JSON(label="JSON (as POST /v1/predict answers)", elem_id="result")
        if examples:
            gr.Examples(examples, [image, names, class_name, skeleton, bbox],
                        label="Examples: held-out categories of the synthetic set")
        button.click(run, [image, names, class_name, skeleton, bbox], [picture, result], api_name=False)
        if categories:
            category.change(fill, category, [names, class_name, skeleton], api_name=False)
    theme = gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"],
                              font_mono=["ui-monospace", "monospace"])  # system fonts: nothing fetched
    gr.mount_gradio_app(api, blocks, path="/", ssr_mode=False, footer_links=[], max_file_size=service.max_upload,
                        allowed_paths=[str(example_dir)], theme=theme, mcp_server=False)


def read_page(data_root: str | None, split: int) -> dict[str, Any]:
    """The page's training categories (the split's train file) and a few examples (the first image of the
    first held-out test categories, with their names, class, skeleton and box), read once where the
    application is built."""
    if not data_root:
        return {}
    from capenext.data.mp100 import DataError, load_split

    root = Path(data_root)
    try:
        train = load_split(root, split, "train", missing="ignore")
        test = load_split(root, split, "test", missing="skip")
    except (DataError, FileNotFoundError, ValueError) as err:
        raise UsageError(f"--data-root {root}: {' '.join(str(err).split())}") from None
    cats = [{"name": c.name, "keypoints": list(c.keypoints), "skeleton": [list(e) for e in c.skeleton]}
            for c in sorted(train.categories.values(), key=lambda c: c.name)]
    examples = []
    for cid, idx in sorted(test.by_category().items()):
        if not idx or len(examples) >= EXAMPLES:
            continue
        s, c = test.samples[idx[0]], test.categories[cid]
        examples.append({"file": s.file_name, "data": test.image_path(s).read_bytes(), "class": c.class_text,
                         "keypoints": list(c.keypoints), "skeleton": [list(e) for e in c.skeleton],
                         "bbox": list(s.bbox)})
    return {"categories": cats, "examples": examples}
