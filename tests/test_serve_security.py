"""Issue 25, the serving side without Ray: a replica's :class:`jobs.serving.app.Service` and its FastAPI app
built in this process around a tiny random-weight checkpoint (``forward`` calls the model directly instead of
``@serve.batch``), driven with Starlette's test client; plus the replica's limits (the pixel budget, the
admission gate) on their own. The same checks against a real ``python -m jobs.serve`` over HTTP are in
``tests/test_serve.py``.
"""

from __future__ import annotations

import asyncio
import io

import numpy as np
import pytest
from PIL import Image

from capenext.predict import Query
from jobs.serving.app import Service
from jobs.serving.limits import ApiError, Gate, PixelBudget
from jobs.serving.web import build_web_app
from jobs.serving.options import ServeOptions, check_options


@pytest.fixture(scope="module")
def checkpoint(random_tiny_checkpoint) -> str:
    return str(random_tiny_checkpoint)


def _service(checkpoint: str, **options) -> Service:
    """A replica's Service in this process; the process-wide PIL settings it makes are put back after."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Image, "MAX_IMAGE_PIXELS", Image.MAX_IMAGE_PIXELS)
        Image.init()
        mp.setattr(Image, "ID", list(Image.ID))
        service = Service(check_options({"checkpoint": checkpoint, **options}))

    async def forward(query):  # what the deployment's @serve.batch method does, one query at a time
        return (await service.run_model([query]))[0]

    service.forward = forward
    return service


@pytest.fixture(scope="module")
def service(checkpoint) -> Service:
    return _service(checkpoint, allow_origins=["https://tools.example.org"], max_queued_requests=5)


@pytest.fixture(scope="module")
def client(service):
    from starlette.testclient import TestClient

    with TestClient(build_web_app(service), base_url="http://127.0.0.1:8000") as c:
        yield c


def _png(w: int = 80, h: int = 60) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (h, w, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def _post(client, headers=None, **fields):
    files = [(k.rstrip("_"), (None, v)) for k, v in fields.items()] + [("image", ("x.png", _png(), "image/png"))]
    return client.post("/v1/predict", files=files, headers=headers or {})


# --- the replica's limits ----------------------------------------------------------------------------


def test_pixel_budget_lets_images_through_only_as_far_as_it_holds():
    """Two images whose pixels together pass the budget are decoded one after the other; an image larger
    than the whole budget still goes, alone; waiting past the timeout is a 503 with Retry-After."""

    async def scenario():
        budget = PixelBudget(100)
        order = []

        async def job(name, pixels, pause):
            async with budget.hold(pixels, timeout=5):
                order.append(f"{name}+")
                await asyncio.sleep(pause)
                order.append(f"{name}-")

        await asyncio.gather(job("a", 60, 0.05), job("b", 60, 0.0), job("c", 30, 0.0))
        assert order[:4] == ["a+", "c+", "c-", "a-"] and order[4:] == ["b+", "b-"], order
        async with budget.hold(10_000, timeout=1):  # larger than the budget: takes all of it
            assert budget.used == 100
            with pytest.raises(ApiError) as err:
                async with budget.hold(1, timeout=0.05):
                    pass
        assert err.value.status == 503 and err.value.headers == {"Retry-After": "1"}
        assert budget.used == 0

    asyncio.run(scenario())


def test_gate_admits_the_working_then_the_waiting_and_refuses_the_next():
    async def scenario():
        gate = Gate(working=2, waiting=1)
        assert await gate.enter(1) and await gate.enter(1)
        third = asyncio.ensure_future(gate.enter(5))
        await asyncio.sleep(0.01)
        assert gate.waiting == 1 and not third.done()
        assert await gate.enter(5) is False and gate.refused == 1  # refused at once, not after 5 s
        gate.leave()
        assert await third is True and gate.active == 2
        gate.leave(), gate.leave()
        assert gate.active == 0

    asyncio.run(scenario())


def test_decode_threads_are_the_replica_cpus_and_the_gradio_queue_is_bounded(service, client):
    assert service._cpu._max_workers == 1 and service._pool._max_workers == 1
    (blocks,) = [r.app.get_blocks() for r in client.app.routes if hasattr(getattr(r, "app", None), "get_blocks")]
    assert blocks._queue.max_size == 5 and blocks._queue.default_concurrency_limit == 8
    assert blocks.delete_cache == (60, 600)  # uploads and pictures go after ten minutes, checked every minute
    assert blocks.max_file_size == service.max_upload


def test_the_deployment_bounds_serves_queue_and_answers_503_with_retry_after(checkpoint):
    from jobs.serving.deployment import build_application

    options = check_options({"checkpoint": checkpoint, "max_ongoing_requests": 10})
    deployment = build_application(options, page={})._bound_deployment
    assert (options.ongoing, options.queued) == (10, 40)  # default: 4 x the ongoing
    assert deployment.max_ongoing_requests == deployment.max_queued_requests == 2 * 10 + 40
    backpressure = deployment._deployment_config.backpressure_config
    assert backpressure.status_code == 503 and backpressure.retry_after_s == 1


# --- the batch: a failing query fails alone ---------------------------------------------------------


def test_a_query_that_fails_in_the_forward_fails_alone(service):
    """Past every check a query can still fail in the model: the batch is predicted again one query at a
    time, the failing one gets its own 400 (a ValueError) or 500, the others their points."""
    rgb = np.random.default_rng(1).integers(0, 255, (50, 70, 3), dtype=np.uint8)
    good = Query(rgb, ["nose", "left eye"], "cat", [], None)
    bad = Query(rgb, ["nose", "a " * 80], "cat", [], None)  # over 77 tokens: not checked here, fails inside

    async def scenario():
        results = await service.run_model([good, bad, good])
        assert isinstance(results[1], ValueError) and "is 82 CLIP tokens" in str(results[1])
        assert not str(results[1]).startswith("query")
        assert results[0] == results[2] == service.predictor.predict(rgb, good.names, "cat")
        with pytest.raises(ApiError) as err:
            await service.answer(bad)
        assert err.value.status == 400 and "82 CLIP tokens" in err.value.message
        boom = Query(rgb, ["nose"], "cat", [], None)
        original = service.predictor.predict_many

        def broken(queries):
            if any(q is boom for q in queries):
                raise RuntimeError("the model broke")
            return original(queries)

        service.predictor.predict_many = broken
        try:
            results = await service.run_model([good, boom])
            assert isinstance(results[1], RuntimeError) and results[0] == results_first
            with pytest.raises(ApiError) as err:
                await service.answer(boom)
            assert err.value.status == 500 and "RuntimeError" in err.value.message
        finally:
            del service.predictor.predict_many

    results_first = service.predictor.predict(rgb, good.names, "cat")
    asyncio.run(scenario())


# --- Host, Origin, docs, health --------------------------------------------------------------------


@pytest.mark.parametrize("host,ok", [("127.0.0.1:8000", True), ("localhost:8000", True), ("[::1]:8000", True),
                                     ("LOCALHOST.", True), ("rebind.attacker.example:8000", False),
                                     ("10.1.2.3:8000", False), ("127.0.0.1:8000:1", False), ("", False)])
def test_host_must_name_this_server(client, host, ok):
    r = client.get("/healthz", headers={"host": host})
    assert r.status_code == (200 if ok else 403), r.text
    if not ok:
        assert "is not a name of this server" in r.json()["error"]


def test_a_wildcard_bind_takes_addresses_and_the_allowed_names_only(checkpoint):
    from starlette.testclient import TestClient

    service = _service(checkpoint, host="0.0.0.0", allow_hosts=["serve.example.org"])
    with TestClient(build_web_app(service)) as c:
        for host, status in [("10.1.2.3:8000", 200), ("[fe80::1]:8000", 200), ("serve.example.org", 200),
                             ("localhost", 200), ("rebind.attacker.example", 403)]:
            assert c.get("/healthz", headers={"host": host}).status_code == status, host
    anything = _service(checkpoint, allow_hosts=["*"])
    with TestClient(build_web_app(anything)) as c:
        assert c.get("/healthz", headers={"host": "behind.a.proxy.example"}).status_code == 200


@pytest.mark.parametrize("origin,status", [
    (None, 200),  # curl, scripts: no Origin
    ("http://127.0.0.1:8000", 200),  # the server's own page
    ("https://127.0.0.1:8000", 200),  # the same, through a TLS proxy that keeps the port
    ("http://127.0.0.1:9000", 403),  # another server on this machine
    ("http://attacker.example", 403),
    ("null", 403),  # a sandboxed frame or a file:// page
    ("https://tools.example.org", 200),  # --allow-origin
    ("https://tools.example.org:443", 200),
])
def test_cross_origin_posts_are_refused_unless_allowed(client, origin, status):
    r = _post(client, headers={"origin": origin} if origin else {}, keypoints="nose", class_="cat")
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json")
    if origin and origin.startswith("https://tools"):
        assert r.headers["access-control-allow-origin"] == origin and r.headers["vary"] == "Origin"
    else:
        assert "access-control-allow-origin" not in r.headers


def test_preflight_is_answered_for_allowed_origins_only(client):
    ask = {"access-control-request-method": "POST", "access-control-request-headers": "content-type"}
    ok = client.options("/v1/predict", headers={"origin": "https://tools.example.org", **ask})
    assert ok.status_code == 204 and ok.headers["access-control-allow-origin"] == "https://tools.example.org"
    assert "POST" in ok.headers["access-control-allow-methods"]
    assert client.options("/v1/predict", headers={"origin": "http://attacker.example", **ask}).status_code == 403


def test_health_names_nothing_and_docs_are_off_unless_asked(checkpoint, client):
    from starlette.testclient import TestClient

    body = client.get("/healthz").json()
    assert set(body) == {"status", "replica"} and body["status"] == "ok"
    assert set(body["replica"]) == {"queries", "batches", "largest_batch", "working", "waiting", "refused_busy"}
    assert client.get("/docs").status_code == 404 and client.get("/redoc").status_code == 404
    with TestClient(build_web_app(_service(checkpoint, api_docs=True)), base_url="http://localhost:8000") as c:
        docs = c.get("/docs")
        assert docs.status_code == 200 and "cdn.jsdelivr.net" in docs.text  # why it is off by default
        assert c.get("/redoc").status_code == 200


def test_bad_fields_are_one_json_line_in_process(client):
    for fields, fragment in [
        ({"keypoints": "q" * 8000, "class_": "cat"}, "'keypoints' name 0 is 8000 characters"),
        ({"keypoints": '["\\u0000class", "cat"]', "class_": "cat"}, "control character U+0000"),
        ({"keypoints": "[" * 50_000, "class_": "cat"}, "nested too deeply"),
        ({"keypoints": "nose", "class_": "cat", "skeleton": "[[" + "1" * 4400 + ", 0]]"}, "too many digits"),
        ({"keypoints": "nose", "class_": "a " * 80}, "'class' (as 'a photo of ...') 'a photo of a a a"),
    ]:
        r = _post(client, **fields)
        assert r.status_code == 400 and fragment in r.json()["error"], (fields.keys(), r.text[:300])
    r = _post(client, keypoints="nose,left eye", class_="cat")
    assert r.status_code == 200 and all(isinstance(p["inside_image"], bool) for p in r.json()["keypoints"])


def test_options_refuse_what_is_not_a_host_or_an_origin():
    from capenext.cli import UsageError

    for bad, fragment in [({"allow_origins": ["tools.example.org"]}, "is not an origin"),
                          ({"allow_origins": ["https://tools.example.org/page"]}, "is not an origin"),
                          ({"allow_hosts": ["https://x.example"]}, "without scheme or port"),
                          ({"max_queued_requests": -1}, "max_queued_requests")]:
        with pytest.raises(UsageError) as err:
            check_options({"checkpoint": "x", **bad})
        assert fragment in str(err.value), str(err.value)
    options = ServeOptions(checkpoint="x", allow_hosts="a.example, B.example.", allow_origins="HTTPS://T.example:443")
    assert options.allow_hosts == ["a.example", "b.example"] and options.allow_origins == ["https://t.example"]
