"""A replica's FastAPI app: ``/healthz``, ``/v1/model``, ``/v1/predict``, JSON errors for everything else
under ``/v1``, the middleware of :mod:`jobs.serving.limits` around it and the page of :mod:`jobs.serving.page`
at ``/``.
"""

from __future__ import annotations

import io

from fastapi import (
    Request,  # at module level: FastAPI resolves the routes' string annotations here
)

from jobs.serving.app import Service, flag, parse_form
from jobs.serving.limits import ApiError, BodyLimit, Guard
from jobs.serving.page import mount_page


def build_web_app(service: Service):
    """The replica's FastAPI app: the JSON API, then the Gradio page mounted at ``/``."""
    from fastapi import FastAPI
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, Response
    from starlette.exceptions import HTTPException

    docs = service.options.api_docs
    api = FastAPI(title="CapeNext", version="1", docs_url="/docs" if docs else None,
                  redoc_url="/redoc" if docs else None, openapi_url="/openapi.json" if docs else None,
                  description="Text-guided category-agnostic pose estimation: keypoints from their names.")

    @api.exception_handler(ApiError)
    async def _api_error(request: Request, err: ApiError):
        return JSONResponse({"error": err.message}, status_code=err.status, headers=err.headers)

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
        return service.health()

    @api.get("/v1/model")
    async def model():
        return service.info

    @api.post("/v1/predict")
    async def predict(request: Request):
        ctype = request.headers.get("content-type", "")
        if not ctype.startswith("multipart/form-data"):
            raise ApiError(415, "POST /v1/predict takes multipart/form-data: image (file), keypoints, class, "
                                f"optional skeleton and bbox (got content-type {ctype[:100] or 'none'!r})")
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
        class_name = service.check_fields(names, skeleton, _text(form, "class"))
        data = await upload.read()
        async with service.decoded(data) as rgb:
            query = await service.check(rgb, names, class_name, skeleton, bbox)
            points = await service.answer(query)
            if flag(request.query_params.get("picture")):
                png = await service.cpu(lambda: _png(service.picture(query, points)))
                return Response(png, media_type="image/png")
            return service.record(query, points)

    routes = {"/healthz": "GET", "/v1/model": "GET", "/v1/predict": "POST"}

    @api.api_route("/v1/{rest:path}", methods=["GET", "POST", "PUT", "PATCH", "DELETE"], include_in_schema=False)
    async def unknown(rest: str, request: Request):  # before the page's mount, which would answer 404 in HTML
        path = f"/v1/{rest}"
        if path in routes:
            raise ApiError(405, f"{path} takes {routes[path]}, not {request.method}")
        raise ApiError(404, f"no API path {path[:100]}: the API has "
                            + ", ".join(f"{m} {p}" for p, m in routes.items()))

    api.add_middleware(BodyLimit, limit=service.max_upload)
    api.add_middleware(Guard, service=service)  # added last: the outermost
    mount_page(api, service)
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
