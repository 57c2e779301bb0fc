"""What the entry points share besides MLflow (:mod:`jobs.tracking`): checkpoint sources, Ray start-up and
cluster sizing, one-line failures, the collate function.

A job may call another job's public ``run``/``main``/``parse_args``/``resolve_config``, nothing else of it;
everything two jobs need lives here or in the library.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from capenext.cli import USER_ERRORS, UsageError

RUN_ID = re.compile(r"[0-9a-f]{32}")
FINAL_ARTIFACT = "checkpoints/final.pt"
# what every --checkpoint takes (resolve_checkpoint), for the jobs' --help
CHECKPOINT_HELP = ("a checkpoint file, runs:/<run_id>/checkpoints/final.pt (or best.pt), a training run id (its "
                   "checkpoints/final.pt), models:/NAME@ALIAS or models:/NAME/VERSION, from the MLflow store")


# --- failures as one line ---------------------------------------------------------------------------


def one_line(err: BaseException, limit: int = 240) -> str:
    """A failure as one line: the innermost ``SomeError: message`` of a (possibly remote) traceback.

    Ray wraps a task's exception (``RayTaskError.cause``) and Ray Train a worker's
    (``WorkerGroupError.worker_failures``); a user error keeps its own message, anything else shows its
    last ``...Error: ...`` line.
    """
    failures = getattr(err, "worker_failures", None)
    if isinstance(failures, dict) and failures:
        return one_line(next(iter(failures.values())), limit)
    cause = getattr(err, "cause", None)
    if isinstance(cause, BaseException) and cause is not err:
        return one_line(cause, limit)
    if isinstance(err, (UsageError, *USER_ERRORS)):
        text = err.args[0] if isinstance(err, KeyError) and err.args else str(err)
        return " ".join(str(text).split())[:limit]
    lines = [ln.strip() for ln in str(err).strip().splitlines() if ln.strip()]
    errs = [ln for ln in lines if re.match(r"^[\w.]+(Error|Exception|Exit|Interrupt)\b:?", ln)]
    text = errs[-1] if errs else f"{type(err).__name__}: {lines[0] if lines else ''}".rstrip(": ")
    return text[:limit]


# --- checkpoint sources ----------------------------------------------------------------------------


@dataclass
class Source:
    """Where a checkpoint came from: the local file, what the user wrote, the training run id when known."""

    path: Path
    spec: str
    run_id: str | None


def resolve_checkpoint(spec: str, tracking_uri: str, download_to: Path) -> Source:
    """A local file, ``runs:/<run_id>/<artifact path>``, a bare run id (its ``checkpoints/final.pt``), or a
    registered model version, ``models:/NAME@ALIAS`` or ``models:/NAME/VERSION`` (its ``checkpoint.pt``, as
    :mod:`jobs.register` stores it), fetched from the MLflow store at ``tracking_uri`` into ``download_to``.
    One line when it cannot be had (no such model, alias or version names what there is)."""
    if Path(spec).is_file():
        return Source(Path(spec), spec, None)
    if RUN_ID.fullmatch(spec):
        spec = f"runs:/{spec}/{FINAL_ARTIFACT}"
    if not spec.startswith(("runs:/", "models:/")):
        raise FileNotFoundError(f"checkpoint not found: {spec} (expected a file, runs:/<run_id>/{FINAL_ARTIFACT}"
                                ", an MLflow run id, models:/NAME@ALIAS or models:/NAME/VERSION)")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # one file: no bar in the log
    import mlflow.artifacts

    def fetch(uri: str) -> Path:
        try:
            return Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(download_to),
                                                            tracking_uri=tracking_uri))
        except Exception as err:  # MlflowException, OSError ... one line either way
            msg = " ".join(str(err).split())[:300]
            raise FileNotFoundError(f"cannot fetch checkpoint {spec} from {tracking_uri}: {msg}") from None

    if spec.startswith("runs:/"):
        return Source(fetch(spec), spec, spec[len("runs:/"):].split("/", 1)[0])

    # a registered model version: looked up with an explicit client (MLflow's models:/ artifact
    # repository would read the process-wide registry URI instead of ``tracking_uri``)
    m = re.fullmatch(r"models:/([^/@]+)(?:@([^/@]+)|/(\d+))", spec)
    if m is None:
        raise FileNotFoundError(f"checkpoint {spec!r}: a registered model is models:/NAME@ALIAS or "
                                "models:/NAME/VERSION")
    name, alias, version = m.groups()
    db = Path(tracking_uri[len("sqlite:///"):].split("?", 1)[0]) if tracking_uri.startswith("sqlite:///") else None
    if db is not None and not db.is_file():  # never create an empty store just to look a model up
        raise FileNotFoundError(f"checkpoint {spec}: no MLflow store at {db} (set MLFLOW_TRACKING_URI to the "
                                "store the model was registered in)")
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri, registry_uri=tracking_uri)
    try:
        model = client.get_registered_model(name)
    except Exception:  # RESOURCE_DOES_NOT_EXIST, or a store without a registry
        try:
            known = sorted(r.name for r in client.search_registered_models(max_results=20))
        except Exception:
            known = []
        raise FileNotFoundError(f"checkpoint {spec}: no registered model {name!r} in {tracking_uri} "
                                f"(registered: {', '.join(known) or 'none'})") from None
    if alias is not None:
        aliases = dict(model.aliases or {})
        if alias not in aliases:
            listed = ", ".join(f"@{a} → version {v}" for a, v in sorted(aliases.items())) or "none"
            raise FileNotFoundError(f"checkpoint {spec}: model {name!r} has no alias {alias!r} (aliases: {listed})")
        version = str(aliases[alias])
    try:
        mv = client.get_model_version(name, version)
        location = client.get_model_version_download_uri(name, version)
    except Exception:
        versions = sorted(int(v.version) for v in client.search_model_versions(f"name = '{name}'"))
        raise FileNotFoundError(f"checkpoint {spec}: model {name!r} has no version {version} (versions: "
                                f"{', '.join(map(str, versions)) or 'none'})") from None
    path = fetch(f"{location.rstrip('/')}/checkpoint.pt")
    return Source(path, spec, mv.run_id or None)


# --- Ray --------------------------------------------------------------------------------------------


def init_ray(address: str | None = None, log_to_driver: bool = False):
    """Reuse an initialised Ray; else ``ray.init(address)``, quietly.

    ``address=None`` is ``ray.init()``'s own lookup: ``RAY_ADDRESS`` (set by ``ray job submit``), a cluster
    started with ``ray start`` on this machine, else a new local instance. The dashboard stays on: Ray
    Train's State API (placement-group cleanup) needs it.
    """
    import ray

    if not ray.is_initialized():
        ray.init(address=address, log_to_driver=log_to_driver, logging_level=logging.ERROR)
    return ray


def check_cluster(num_workers: int, cpus_per_worker: float, use_gpu: bool) -> None:
    """Fail fast when the cluster cannot hold the workers asked for (instead of waiting forever)."""
    import ray

    total = ray.cluster_resources()
    need_cpu = num_workers * cpus_per_worker
    if need_cpu > total.get("CPU", 0):
        raise UsageError(f"asked for {num_workers} workers x {cpus_per_worker} CPUs = {need_cpu:g} CPUs, "
                         f"the Ray cluster has {total.get('CPU', 0):g}: lower --num-workers or --cpus-per-worker")
    if use_gpu and num_workers > total.get("GPU", 0):
        raise UsageError(f"asked for {num_workers} GPU workers, the Ray cluster has {total.get('GPU', 0):g} GPUs")


# --- benchmarks -----------------------------------------------------------------------------------


def machine() -> dict[str, Any]:
    """CPU model (``lscpu``'s "Model name"), core count and the GPU when one is visible: every benchmark's
    JSON says what it ran on."""
    import contextlib
    import platform
    import subprocess

    model = platform.processor() or "unknown"
    with contextlib.suppress(Exception):
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        model = next(ln.split(":", 1)[1].strip() for ln in out.splitlines() if ln.startswith("Model name"))
    info: dict[str, Any] = {"cpu": model, "cores": os.cpu_count()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


# --- batches ----------------------------------------------------------------------------------------


def collate(items: list[dict]) -> dict:
    """Stack the items of :func:`capenext.data.make_item` (all tensors of one shape per key)."""
    return {k: torch.stack([it[k] for it in items]) for k in items[0]}
