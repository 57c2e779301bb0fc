"""The serving application's options: :class:`ServeOptions`, what ``python -m jobs.serve``'s flags, ``serve run
jobs.serve:app key=value ...`` and a Serve config's ``args`` all become, validated in one place.

Nothing here names Ray: the deployment (:mod:`jobs.serving.deployment`), the HTTP layer
(:mod:`jobs.serving.app`), the command line (:mod:`jobs.serve`) and the serving benchmark read these.
"""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from pydantic import BaseModel, Field, ValidationInfo, field_validator, model_validator

from capenext.cli import UsageError
from capenext.options import DEVICES, RUNTIMES  # --device's and --runtime's choices

APP_NAME = "capenext"
DEPLOYMENT_NAME = "CapeNext"
DEFAULT_PORT = 8000
LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")  # names of this machine a request's Host may always carry
WILDCARD_HOSTS = ("0.0.0.0", "::")  # binding every interface
DEFAULT_PORTS = {"http": 80, "https": 443}


class ServeOptions(BaseModel):
    """Every option of the application; ``serve run jobs.serve:app key=value ...`` and the ``args`` of a
    Serve config are validated against it (the command line's flags are the same names with dashes)."""

    checkpoint: str
    tracking_uri: str | None = None  # MLflow store for runs:/ and models:/ (default MLFLOW_TRACKING_URI)
    clip_checkpoint: str | None = None  # where the frozen CLIP's weights are on the replicas' machines
    device: str = "cpu"  # cpu or cuda
    runtime: str = "torch"  # torch, or onnx: onnxruntime on CPU over the folder ``onnx``
    onnx: str | None = None  # with runtime onnx: the folder python -m jobs.export wrote from the checkpoint
    replicas: int = Field(1, ge=1)
    autoscale: str | None = None  # "MIN,MAX" replicas, instead of a fixed count
    cpus_per_replica: float = Field(1.0, gt=0)
    gpus_per_replica: float | None = Field(None, ge=0)  # default: 1 with device cuda, else 0
    max_batch_size: int = Field(8, ge=1)
    batch_wait_ms: float = Field(5.0, ge=0)
    max_ongoing_requests: int | None = Field(None, ge=1)  # per replica; default max(2 x batch, 16)
    max_queued_requests: int | None = Field(None, ge=0)  # per replica, beyond the ongoing; default 4 x ongoing
    max_upload_mb: float = Field(20.0, gt=0)
    max_pixels: int = Field(40_000_000, ge=1)
    max_decoded_pixels: int | None = Field(None, ge=1)  # decoded at once per replica; default max_pixels
    request_timeout_s: float = Field(60.0, gt=0)
    host: str = "127.0.0.1"  # the address the proxy binds: its names are the Host values accepted
    allow_hosts: list[str] = []  # more Host names accepted ("*": any, only behind a proxy that checks Host)
    allow_origins: list[str] = []  # origins (scheme://host[:port]) whose pages may POST here
    api_docs: bool = False  # /docs and /redoc (Swagger UI and ReDoc load their scripts from a CDN)
    data_root: str | None = None  # an MP-100 layout: the page's categories and examples
    split: int = 1

    model_config = {"extra": "forbid"}

    @field_validator("device", "runtime")
    @classmethod
    def _one_of(cls, v: str, info: ValidationInfo) -> str:
        choices = {"device": DEVICES, "runtime": RUNTIMES}[info.field_name]
        if v not in choices:
            raise ValueError(f"{info.field_name} {v!r}: {' or '.join(choices)}")
        return v

    @field_validator("autoscale")
    @classmethod
    def _autoscale(cls, v: str | None) -> str | None:
        if v is not None:
            autoscale_bounds(v)
        return v

    @field_validator("allow_hosts", "allow_origins", mode="before")
    @classmethod
    def _comma_list(cls, v: Any) -> Any:  # serve run ... allow_hosts=a,b gives one string
        return [p for p in (x.strip() for x in v.split(",")) if p] if isinstance(v, str) else v

    @field_validator("allow_hosts")
    @classmethod
    def _hosts(cls, v: list[str]) -> list[str]:
        out = []
        for h in v:
            name = host_name(h)
            if not name or any(c in name for c in "/@ ") or (":" in name and not is_ip_address(name)):
                raise ValueError(f"allow_hosts {h!r}: a host name or address, without scheme or port (e.g. "
                                 "serve.example.org)")
            out.append(name)
        return out

    @field_validator("allow_origins")
    @classmethod
    def _origins(cls, v: list[str]) -> list[str]:
        return [normalize_origin(o) for o in v]

    @model_validator(mode="after")
    def _gpus(self) -> ServeOptions:
        gpus = self.gpus_per_replica
        if self.device == "cuda" and gpus == 0:
            raise ValueError("device cuda needs gpus_per_replica > 0 (a replica sees only the GPUs Ray gives it)")
        if self.device != "cuda" and gpus:
            raise ValueError(f"gpus_per_replica {gpus:g} with device cpu: pass device cuda to use the GPU")
        return self

    @model_validator(mode="after")
    def _onnx(self) -> ServeOptions:
        """As :func:`capenext.options.check_runtime` checks ``--runtime`` and ``--onnx`` on the command line."""
        if self.runtime == "onnx" and not self.onnx:
            raise ValueError("runtime onnx needs onnx=DIR (a folder written by python -m jobs.export)")
        if self.runtime == "onnx" and self.device != "cpu":
            raise ValueError("runtime onnx runs on CPU (onnxruntime): use device cpu")
        if self.runtime != "onnx" and self.onnx:
            raise ValueError("onnx=DIR is read with runtime onnx only: add runtime=onnx")
        return self

    @property
    def gpus(self) -> float:
        if self.gpus_per_replica is not None:
            return self.gpus_per_replica
        return 1.0 if self.device == "cuda" else 0.0

    @property
    def ongoing(self) -> int:
        """Requests a replica works on at once (reading, decoding, in a forward)."""
        return self.max_ongoing_requests or max(2 * self.max_batch_size, 16)

    @property
    def queued(self) -> int:
        """Requests that wait for one of those, per replica; past them, 503 at once."""
        return self.max_queued_requests if self.max_queued_requests is not None else 4 * self.ongoing

    @property
    def replica_capacity(self) -> int:
        """Serve's ``max_ongoing_requests``: what the proxy hands one replica. The replica works on
        :attr:`ongoing`, keeps :attr:`queued` waiting, and answers as many again as :attr:`ongoing` at once
        with a 503 (JSON, ``Retry-After``); only past all of those do requests wait in Serve's own queue
        (``max_queued_requests``, the same number, Serve's own 503 past it)."""
        return 2 * self.ongoing + self.queued

    @property
    def decoded_pixels(self) -> int:
        """Pixels a replica decodes and holds at once (one largest image, or many small ones)."""
        return self.max_decoded_pixels or self.max_pixels

    @property
    def min_replicas(self) -> int:
        """Replicas running from the start: the fixed count, or the autoscaler's lower bound (at least 1)."""
        return max(autoscale_bounds(self.autoscale)[0] if self.autoscale else self.replicas, 1)


def is_ip_address(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
        return True
    except ValueError:
        return False


def host_name(text: str) -> str:
    """A Host value or host name as compared: lower case, no trailing dot, IPv6 without brackets."""
    name = text.strip().lower().rstrip(".")
    if name.startswith("[") and name.endswith("]"):
        name = name[1:-1]
    return name


def normalize_origin(text: str) -> str:
    """``scheme://host[:port]`` as browsers send it in ``Origin`` (lower case, no default port); one line
    when ``text`` is not an origin."""
    try:
        parts = urlsplit(text.strip())
        port = parts.port
    except ValueError:
        parts, port = None, None
    if (parts is None or parts.scheme not in DEFAULT_PORTS or not parts.hostname or parts.path not in ("", "/")
            or parts.query or parts.fragment or parts.username or parts.password):
        raise ValueError(f"allow_origins {text!r} is not an origin: scheme://host[:port], e.g. "
                         "https://tools.example.org")
    host = parts.hostname.lower().rstrip(".")
    host = f"[{host}]" if ":" in host else host
    return f"{parts.scheme}://{host}" + (f":{port}" if port and port != DEFAULT_PORTS[parts.scheme] else "")


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
    checkpoint or CLIP file and the ``onnx`` folder become absolute paths and the default MLflow store that of
    this working directory (replicas run elsewhere); one line for a bad option."""
    from jobs.runtime.tracking import tracking_uri

    try:
        options = ServeOptions(**values)
    except Exception as err:  # pydantic ValidationError
        raise UsageError(f"serve options: {options_error(err)}") from None
    changes: dict[str, Any] = {"tracking_uri": tracking_uri(options.tracking_uri)}
    for key in ("checkpoint", "clip_checkpoint"):
        value = getattr(options, key)
        if value and Path(value).is_file():
            changes[key] = str(Path(value).resolve())
    if options.onnx and Path(options.onnx).is_dir():
        changes["onnx"] = str(Path(options.onnx).resolve())
    return options.model_copy(update=changes)
