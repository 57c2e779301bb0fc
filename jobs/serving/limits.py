"""What a replica holds to keep one request from hurting the others: the errors every layer answers with,
the pixel budget and admission gate, and the ASGI middleware in front of the routes (Host and Origin checks,
the admission of ``POST /v1/predict``, the upload limit). Nothing here names Ray or FastAPI's routes.
"""

from __future__ import annotations

import asyncio
import json
import logging
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator
from urllib.parse import urlsplit

from jobs.serving.options import (
    DEFAULT_PORTS,
    LOCAL_HOSTS,
    WILDCARD_HOSTS,
    ServeOptions,
    host_name,
    is_ip_address,
    normalize_origin,
)

MB = 1 << 20
RETRY_AFTER_S = 1  # what a busy replica (and Serve's proxy, when its queue is full) tells clients to wait
UNSAFE_METHODS = (b"POST", b"PUT", b"PATCH", b"DELETE")
log = logging.getLogger("capenext.serve")


class ApiError(Exception):
    """A bad request: answered with ``status`` and ``{"error": message}``."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.headers = status, " ".join(message.split()), headers


class BodyTooLarge(ApiError):
    def __init__(self, limit: int):
        super().__init__(413, f"upload over the limit of {limit / MB:g} MB (the server's --max-upload-mb)")


# --- limits held by a replica -------------------------------------------------------------------------


class PixelBudget:
    """At most ``limit`` decoded pixels held at once by a replica's requests: a request takes its image's
    pixels (at most the whole budget, so that one image always fits alone) before decoding it and gives them
    back when answered; others wait (``timeout``, then a 503)."""

    def __init__(self, limit: int):
        self.limit, self.used = int(limit), 0
        self._cond = asyncio.Condition()

    @asynccontextmanager
    async def hold(self, pixels: int, timeout: float) -> AsyncIterator[None]:
        n = max(1, min(int(pixels), self.limit))
        async with self._cond:
            try:
                async with asyncio.timeout(timeout):
                    await self._cond.wait_for(lambda: self.used + n <= self.limit)
            except TimeoutError:
                raise ApiError(503, f"the server is busy decoding other images (more than {self.limit} pixels "
                                    f"at once, the server's --max-decoded-pixels); try again",
                               {"Retry-After": str(RETRY_AFTER_S)}) from None
            self.used += n
        try:
            yield
        finally:
            async with self._cond:
                self.used -= n
                self._cond.notify_all()


class Gate:
    """Admission to ``POST /v1/predict``: ``working`` requests at once, ``waiting`` more in line (their bodies
    not read yet); one more is refused at once (:meth:`enter` returns ``False``)."""

    def __init__(self, working: int, waiting: int):
        self.working, self.waiting_limit = working, waiting
        self.active = self.waiting = self.refused = 0
        self._slots = asyncio.Semaphore(working)

    async def enter(self, timeout: float) -> bool:
        if self._slots.locked():
            if self.waiting >= self.waiting_limit:
                self.refused += 1
                return False
            self.waiting += 1
            try:
                async with asyncio.timeout(timeout):
                    await self._slots.acquire()
            except TimeoutError:
                self.refused += 1
                return False
            finally:
                self.waiting -= 1
        else:
            await self._slots.acquire()
        self.active += 1
        return True

    def leave(self) -> None:
        self.active -= 1
        self._slots.release()


def busy_message(options: ServeOptions) -> str:
    return (f"the server is busy ({options.ongoing} requests at work and {options.queued} waiting per replica, "
            "the server's --max-ongoing-requests and --max-queued-requests); try again shortly")


# --- ASGI middleware ----------------------------------------------------------------------------------


class BodyLimit:
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


def _split_host(value: str) -> tuple[str, int | None]:
    """A ``Host`` header → (name as :func:`host_name` writes it, port or None); ``("", None)`` if malformed."""
    value = value.strip()
    if value.startswith("["):
        end = value.find("]")
        if end < 0:
            return "", None
        name, rest = value[1:end], value[end + 1:]
        port = rest[1:] if rest.startswith(":") else None
        if rest and port is None:
            return "", None
    elif value.count(":") > 1:  # an IPv6 address without brackets is not a Host value
        return "", None
    else:
        name, _, port = value.partition(":")
        port = port or None
    if port is not None and (not port.isdigit() or len(port) > 5):
        return "", None
    return host_name(name), int(port) if port is not None else None


class Guard:
    """ASGI middleware, outermost: the ``Host`` and ``Origin`` checks, the admission gate of
    ``POST /v1/predict``, CORS headers for ``--allow-origin`` pages, and a JSON 500 for an exception that
    nothing answered."""

    def __init__(self, app, service: Any):  # a jobs.serving.app.Service
        self.app, self.service = app, service
        options = service.options
        self.any_host = "*" in options.allow_hosts
        self.wildcard = host_name(options.host) in WILDCARD_HOSTS
        self.hosts = {host_name(h) for h in (*LOCAL_HOSTS, options.host, *options.allow_hosts)}
        self.origins = set(options.allow_origins)

    def host_allowed(self, name: str) -> bool:
        if self.any_host:
            return True
        # bound to every interface, clients use any of the machine's addresses; an address is no DNS rebinding
        return bool(name) and (name in self.hosts or (self.wildcard and is_ip_address(name)))

    @staticmethod
    def same_origin(origin: str, host: str) -> bool:
        """Whether ``origin`` is this server as the request reached it (its ``Host``): the same name, and the
        same port (a ``Host`` without one: the origin's scheme's default, so that a TLS proxy in front, which
        passes ``Host`` on, keeps the page working)."""
        try:
            parts = urlsplit(origin.strip())
            oport = parts.port or DEFAULT_PORTS.get(parts.scheme)
        except ValueError:
            return False
        name, port = _split_host(host)
        if not name or parts.scheme not in DEFAULT_PORTS or host_name(parts.hostname or "") != name:
            return False
        return oport == (port if port is not None else DEFAULT_PORTS[parts.scheme])

    async def __call__(self, scope, receive, send):
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        headers = {}
        for k, v in scope.get("headers") or []:
            headers.setdefault(k.lower(), v)
        host = headers.get(b"host", b"").decode("latin-1")
        name, _ = _split_host(host)
        if not self.host_allowed(name):
            return await _refuse(scope, send, 403, f"Host {host[:100]!r} is not a name of this server (it answers "
                                                   "127.0.0.1, localhost, [::1], its --host and each --allow-host)")
        origin = headers.get(b"origin", b"").decode("latin-1") or None
        method = scope.get("method", "GET").encode()
        cross = origin is not None and not self.same_origin(origin, host)
        allowed_cross = False
        if cross:
            try:
                allowed_cross = normalize_origin(origin) in self.origins
            except ValueError:
                allowed_cross = False
        if cross and not allowed_cross and (method in UNSAFE_METHODS or scope["type"] == "websocket"
                                            or method == b"OPTIONS"):
            return await _refuse(scope, send, 403, f"cross-origin request from {origin[:100]!r} refused (the "
                                                   "server takes requests from its own page, and from each "
                                                   "--allow-origin)")
        if allowed_cross and method == b"OPTIONS":  # a preflight from an allowed page
            return await _send_json(send, 204, None, _cors(origin, preflight=headers))
        if scope["type"] == "websocket":
            return await self.app(scope, receive, send)

        started = False

        async def sending(message):
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                if allowed_cross:
                    message = {**message, "headers": [*message.get("headers", []), *_cors(origin)]}
            await send(message)

        gated = method == b"POST" and scope.get("path") == "/v1/predict"
        if gated and not await self.service.gate.enter(self.service.options.request_timeout_s):
            return await _send_json(sending, 503, {"error": busy_message(self.service.options)},
                                    [(b"retry-after", str(RETRY_AFTER_S).encode())])
        try:
            await self.app(scope, receive, sending)
        except Exception as err:  # noqa: BLE001 -- one JSON line for the client, the traceback in the log
            if started:
                raise
            if isinstance(err, ApiError):
                await _send_json(sending, err.status, {"error": err.message})
            else:
                log.error("request failed", exc_info=err)
                await _send_json(sending, 500, {"error": f"internal error ({type(err).__name__}); the server's log "
                                                         "has the details"})
        finally:
            if gated:
                self.service.gate.leave()


def _cors(origin: str, preflight: dict | None = None) -> list[tuple[bytes, bytes]]:
    out = [(b"access-control-allow-origin", origin.encode("latin-1")), (b"vary", b"Origin")]
    if preflight is not None:
        asked = preflight.get(b"access-control-request-headers", b"")[:200]
        out += [(b"access-control-allow-methods", b"GET, POST"), (b"access-control-max-age", b"600")]
        if asked:
            out.append((b"access-control-allow-headers", asked))
    return out


async def _refuse(scope, send, status: int, message: str) -> None:
    if scope["type"] == "websocket":
        await send({"type": "websocket.close", "code": 1008})
        return
    await _send_json(send, status, {"error": message})


async def _send_json(send, status: int, body: dict | None, headers: list | None = None) -> None:
    data = json.dumps(body).encode() if body is not None else b""
    head = [(b"content-length", str(len(data)).encode()), (b"connection", b"close")]
    if body is not None:
        head.insert(0, (b"content-type", b"application/json"))
    await send({"type": "http.response.start", "status": status, "headers": head + list(headers or [])})
    await send({"type": "http.response.body", "body": data})
