"""The serving application's options: :class:`ServeOptions`, what ``python -m jobs.serve``'s flags, ``serve run
jobs.serve:app key=value ...`` and a Serve config's ``args`` all become, validated in one place.

Nothing here names Ray: the deployment (:mod:`jobs.serving.deployment`), the HTTP layer
(:mod:`jobs.serving.app`), the command line (:mod:`jobs.serve`) and the serving benchmark read these.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field, field_validator, model_validator

from capenext.cli import UsageError

APP_NAME = "capenext"
DEPLOYMENT_NAME = "CapeNext"
DEFAULT_PORT = 8000
DEVICES = ("cpu", "cuda")  # as pipelines.runtime.options.add_device's --device


class ServeOptions(BaseModel):
    """Every option of the application; ``serve run jobs.serve:app key=value ...`` and the ``args`` of a
    Serve config are validated against it (the command line's flags are the same names with dashes)."""

    checkpoint: str
    tracking_uri: str | None = None  # MLflow store for runs:/ and models:/ (default MLFLOW_TRACKING_URI)
    clip_checkpoint: str | None = None  # where the frozen CLIP's weights are on the replicas' machines
    device: str = "cpu"  # cpu or cuda
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
        if v not in DEVICES:
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
        if self.device == "cuda" and gpus == 0:
            raise ValueError("device cuda needs gpus_per_replica > 0 (a replica sees only the GPUs Ray gives it)")
        if self.device != "cuda" and gpus:
            raise ValueError(f"gpus_per_replica {gpus:g} with device cpu: pass device cuda to use the GPU")
        return self

    @property
    def gpus(self) -> float:
        if self.gpus_per_replica is not None:
            return self.gpus_per_replica
        return 1.0 if self.device == "cuda" else 0.0

    @property
    def ongoing(self) -> int:
        return self.max_ongoing_requests or max(2 * self.max_batch_size, 16)

    @property
    def min_replicas(self) -> int:
        """Replicas running from the start: the fixed count, or the autoscaler's lower bound (at least 1)."""
        return max(autoscale_bounds(self.autoscale)[0] if self.autoscale else self.replicas, 1)


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
    from pipelines.runtime.tracking import tracking_uri

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
